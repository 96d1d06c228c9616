"""What the commands read before any work: prompt sets, behaviours, models and option text, each checked with a clear error."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import typer

if TYPE_CHECKING:
    import torch

__all__ = ["BEHAVIOURS", "DTYPES", "behaviour_of", "check_methods", "dtype_of", "echo_report", "floats",
           "fresh_out", "load_pair_checked", "names", "prompt_sets", "protocol_sets", "same_place"]

BEHAVIOURS = ("refusal", "bias")
DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}


def dtype_of(name: str) -> "torch.dtype":
    """The torch dtype of ``--dtype``'s text."""
    import torch

    if name not in DTYPES:
        raise typer.BadParameter(f"unknown dtype {name!r}; one of {sorted(set(DTYPES.values()))}", param_hint="--dtype")
    return getattr(torch, DTYPES[name])


def prompt_sets(behaviour: str, harmful: Optional[Path], harmless: Optional[Path], pairs: Optional[Path],
                 fmt: Optional[str], column: Optional[str], seed: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """The prompt sets of ``behaviour`` (user files, else bundled) and the data record of the run."""
    from cnt_lens.data.formats import describe_file, load_file
    from cnt_lens.data.prompt_set import default_harmful, default_harmless, load_prompts

    if behaviour not in BEHAVIOURS:
        raise typer.BadParameter(f"unknown behaviour {behaviour!r}; one of {BEHAVIOURS}", param_hint="--behaviour")
    files = {"harmful": harmful, "harmless": harmless} if behaviour == "refusal" else {"pairs": pairs}
    unused = [f"--{k}" for k, v in {"harmful": harmful, "harmless": harmless, "pairs": pairs}.items()
              if v is not None and k not in files]
    if unused:
        raise typer.BadParameter(f"{', '.join(unused)} do(es) not apply to --behaviour {behaviour}")
    bundled = {"harmful": default_harmful, "harmless": default_harmless,
               "pairs": lambda: load_prompts("bias_pairs")}
    sets, record = {}, {}
    for role, path in files.items():
        if path is None:
            sets[role] = bundled[role]()
            record[role] = {"bundled": sets[role].name, "n": len(sets[role]), "splits": sets[role].split_counts()}
            continue
        try:
            sets[role] = load_file(path, fmt, column=column, role=role if role != "pairs" else None,
                                   kind="pair" if role == "pairs" else "prompt", seed=seed)
        except (OSError, ValueError) as err:
            raise typer.BadParameter(str(err), param_hint=f"--{role}") from None
        record[role] = describe_file(path, sets[role])
    return sets, record


def protocol_sets(protocol: str, behaviour: str, bundled: bool, sets: dict[str, Any],
                   record: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``sets`` re-split by ``protocol`` (``split``: as they are; ``cross``: the bundled refusal prompts by family)."""
    from cnt_lens.data.prompt_set import cross_harmful, cross_harmless

    if protocol not in ("split", "cross"):
        raise typer.BadParameter(f"unknown protocol {protocol!r}; one of ['cross', 'split']", param_hint="--protocol")
    if protocol == "cross" and not (behaviour == "refusal" and bundled):
        raise typer.BadParameter("cross re-splits the bundled refusal prompts by family (neurons on the bundled set, "
                                 "k and alpha on AdvBench, framings held out); with your own prompt files, or for "
                                 "bias, use --protocol split", param_hint="--protocol")
    if protocol == "split":
        return sets, record
    sets = {"harmful": cross_harmful(), "harmless": cross_harmless()}
    return sets, {role: {"bundled": ps.name, "protocol": "cross", "n": len(ps), "splits": ps.split_counts()}
                  for role, ps in sets.items()}


def behaviour_of(behaviour: str, sets: dict[str, Any]) -> Any:
    """The behaviour ``--behaviour`` names, on ``sets``."""
    from cnt_lens import Refusal, StereotypeBias

    if behaviour == "refusal":
        return Refusal(harmful=sets["harmful"], harmless=sets["harmless"])
    return StereotypeBias(pairs=sets["pairs"])


def load_pair_checked(donor: str, target: str, device: Optional[str], dtype: str) -> Any:
    """The pair, or a ``--donor/--target`` error when the two do not fit together."""
    from cnt_lens.models.loading import IncompatibleModelsError
    from cnt_lens.models.pair import load_pair

    try:
        return load_pair(donor, target, device=device, dtype=dtype_of(dtype))
    except IncompatibleModelsError as err:
        raise typer.BadParameter(str(err), param_hint="--donor/--target") from None


def echo_report(report: Any) -> None:
    """The report's table, the field's units (refusals per 100, first-token KL), then each family's share of the gap."""
    typer.echo(report.table())
    units = report.units_table()
    if units:
        typer.echo("\nIn the field's units (test split; KL from the unedited target on harmless prompts):\n" + units)
    shares = report.shares_table()
    if shares:
        typer.echo("\n" + shares)


def floats(text: str, name: str) -> tuple[float, ...]:
    """Comma-separated numbers (option ``name``'s text)."""
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated numbers, got {text!r}", param_hint=name) from None


def names(text: str) -> tuple[str, ...]:
    """Comma-separated names; ``none`` or nothing: none."""
    return () if text.strip().lower() in ("", "none") else tuple(x.strip() for x in text.split(",") if x.strip())


def check_methods(names: tuple[str, ...], what: str, hint: str) -> None:
    """Refuse scoring-method names that are not registered, before anything is loaded."""
    from cnt_lens.method.scoring import METHODS

    bad = [m for m in names if m not in METHODS]
    if bad:
        raise typer.BadParameter(f"unknown {what} {bad}; one of {list(METHODS)}", param_hint=hint)


def fresh_out(out: Path, overwrite: bool) -> None:
    """Refuse a non-empty ``--out`` unless ``--overwrite``."""
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise typer.BadParameter(f"{out} exists and is not empty; choose a new directory or pass --overwrite to write "
                                 "into it (a run stopped there continues from its resume/ folder)", param_hint="--out")


def same_place(a: str | Path, b: str | Path) -> bool:
    """Whether two existing paths are the same place."""
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()
