"""The ``cnt-lens`` command line (typer: typed options, help text and errors for free).

cnt-lens demo --out runs/demo          # the main job, offline, on the bundled SmolLM2
cnt-lens run realign --out runs/realign  # enhance | disalign | realign | bias-removal
cnt-lens transfer --donor D --target T --out runs/mine   # any compatible pair, any prompt files
cnt-lens score --donor D --target T --out runs/scores    # neuron scores only
cnt-lens measure smollm2-135m-instruct # behaviour numbers of any model
cnt-lens transplant PATCH MODEL --out DIR
cnt-lens report runs/demo              # rebuild report.html from a run directory
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import typer

from .errors import CntLensError
from .timing import profile, stage, timings_table

if TYPE_CHECKING:
    import torch

EXPECTED = (ValueError, OSError, CntLensError)
"""Errors whose message is the whole story (bad input, damaged files, missing models): printed as one line."""


class _App(typer.Typer):
    """The ``cnt-lens`` program: an expected error prints its message and exits 1, with no traceback.

    ``cnt-lens --debug ...`` lets it through with its traceback, for a bug report.
    """

    debug = False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().__call__(*args, **kwargs)
        except EXPECTED as err:
            if _App.debug:
                raise
            print(f"cnt-lens: error: {err}\n(cnt-lens --debug ... shows where it was raised)", file=sys.stderr)
            sys.exit(1)


app = _App(add_completion=False, no_args_is_help=True, help=__doc__.split("\n\n")[0], pretty_exceptions_enable=False,
           rich_markup_mode="markdown")  # docstrings' ``code`` renders as code, not as raw backticks


def _examples(*lines: str) -> str:
    """A command's ``--help`` epilog: each example command on its own line."""
    return "**Examples**\n\n" + "\n\n".join(f"`{line}`" for line in lines)


@app.callback()
def main(log_level: str = typer.Option("INFO", help="Logging level of cnt_lens's messages: DEBUG, INFO, WARNING."),
         debug: bool = typer.Option(False, "--debug", help="Show the traceback of an expected error too.")) -> None:
    """Set up logging: one timestamped line per pipeline stage on stderr (progress bars only on a terminal)."""
    _App.debug = debug
    level = getattr(logging, log_level.upper(), None)
    if not isinstance(level, int):
        raise typer.BadParameter(f"unknown log level {log_level!r}", param_hint="--log-level")
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("[cnt-lens %(asctime)s] %(message)s", datefmt="%H:%M:%S"))
    logger = logging.getLogger("cnt_lens")
    logger.handlers = [handler]
    logger.setLevel(level)
    logger.propagate = False


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (test runners and notebooks swap it)."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


@app.command(epilog=_examples('cnt-lens demo --out runs/demo', 'cnt-lens demo --out runs/demo-all --baselines all', 'cnt-lens demo --out runs/demo-gpu --device cuda'))
def demo(
    out: Path = typer.Option(Path("runs/demo"), help="Run directory to write."),
    baselines: str = typer.Option("random", help="Baselines to compare with: comma-separated, none, or all (the "
                                  "seven of `cnt-lens run enhance`, each also given the main method's own search)."),
    device: Optional[str] = typer.Option(None, help="torch device for both models, e.g. cuda (default: cpu)."),
    progress: bool = typer.Option(True, help="Show progress bars."),
) -> None:
    """The main job: transfer refusal into the bundled SmolLM2 with a minimal neuron set.

    The donor is the cached safety tune of the same model. Neurons, k and alpha are chosen on the
    bundled harmful prompts; the test report reads them beside AdvBench's requests and three framings
    (role-play, writing, backstory) that no choice saw, each with its share of the donor–target gap.
    The patch — ranking, search and test numbers — is the one ``cnt-lens run enhance`` finds; the demo
    compares it with the random baseline at the same
    budget and alpha (five seeds) by default, and with all seven baselines, each with its own search
    (= ``cnt-lens run enhance``, several times longer), with ``--baselines all``.
    """
    chosen = None if baselines.strip().lower() == "all" else _names(baselines)  # ``run`` checks the names
    # every option spelled out: called as a function, ``run``'s defaults are typer's OptionInfo objects
    run(application="enhance", out=out, model="smollm2-135m-instruct", rounds=None,
        baselines=None if chosen is None else ",".join(chosen) or "none", alphas=None, max_fraction=None, screen=True,
        protocol="split", objective="opening", random_seeds=None, search_baselines=chosen is None, device=device,
        progress=progress)


@app.command(epilog=_examples('cnt-lens run enhance --out runs/enhance', 'cnt-lens run disalign --out runs/disalign --rounds 4', 'cnt-lens run delete-refusal --model qwen2.5-coder-0.5b-instruct --out runs/qwen-delete --baselines random'))
def run(
    application: str = typer.Argument(..., help="enhance | disalign | delete-refusal | realign | bias-removal"),
    out: Path = typer.Option(..., help="Run directory to write."),
    model: str = typer.Option("smollm2-135m-instruct", help="Base model the recipes tune: an offline alias "
                              "(smollm2-135m-instruct, qwen2.5-coder-0.5b-instruct), hub name, directory or .gguf."),
    rounds: Optional[int] = typer.Option(None, help="Re-scoring rounds of the main ranking (0 = one pass; "
                                         "default: the application's)."),
    baselines: Optional[str] = typer.Option(None, help="Comma-separated baselines, or none (default: all seven)."),
    alphas: Optional[str] = typer.Option(None, help="Transplant strengths searched on validation, e.g. 1,2,4 "
                                         "(default: the application's)."),
    max_fraction: Optional[float] = typer.Option(None, help="Largest budget searched, as a fraction of all MLP "
                                                 "neurons (default: the application's)."),
    screen: bool = typer.Option(True, help="Decide search points by cheap estimates and evaluate in full only "
                                "the points that matter (--no-screen: every point in full)."),
    protocol: str = typer.Option("split", help="split: neurons, k and alpha on the bundled prompts' own splits, "
                                 "AdvBench and three framings held out for the report; cross: neurons on the "
                                 "bundled prompts, k and alpha on AdvBench, the framings held out."),
    objective: str = typer.Option("opening", help="What refusal rankings read: opening (log-odds of a refusal "
                                  "opening) or continuation (log p of the refusing model's own refusal sentence)."),
    random_seeds: Optional[int] = typer.Option(None, min=1, help="Seeds of the random baseline evaluated on test "
                                               "(default: 5)."),
    search_baselines: bool = typer.Option(True, help="Give every baseline the main method's own search over k and "
                                          "alpha as well (--no-search-baselines: each baseline only picks alpha at the "
                                          "main method's k)."),
    device: Optional[str] = typer.Option(None, help="torch device for both models, e.g. cuda (default: cpu)."),
    progress: bool = typer.Option(True, help="Show progress bars."),
) -> None:
    """Run one CNT / NLSR application end to end (see cnt_lens.experiments.applications)."""
    from .experiments.applications import APPLICATIONS, OBJECTIVES, PROTOCOLS, run_application

    if application not in APPLICATIONS:
        raise typer.BadParameter(f"unknown application {application!r}; one of {sorted(APPLICATIONS)}")
    if protocol not in PROTOCOLS:
        raise typer.BadParameter(f"unknown protocol {protocol!r}; one of {sorted(PROTOCOLS)}", param_hint="--protocol")
    if objective not in OBJECTIVES:
        raise typer.BadParameter(f"unknown objective {objective!r}; one of {sorted(OBJECTIVES)}", param_hint="--objective")
    chosen = None if baselines is None else _names(baselines)
    _check_methods(chosen or (), "baseline(s)", "--baselines")
    t0 = time.time()
    report = run_application(application, out, model=model, rounds=rounds, baselines=chosen, device=device,
                             alphas=None if alphas is None else _floats(alphas, "--alphas"), max_fraction=max_fraction,
                             screen=screen, protocol=protocol, objective=objective, random_seeds=random_seeds,
                             search_baselines=search_baselines, progress=progress)
    _echo_report(report)
    typer.echo(timings_table(out / "timings.json"))
    typer.echo(f"wrote {out}/metrics.json, patch.safetensors, patched_model/, report.html in {time.time() - t0:.0f} s")


# --------------------------------------------------------------------------- shared options

BEHAVIOURS = ("refusal", "bias")
DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}

BEHAVIOUR = typer.Option("refusal", "--behaviour", help="refusal (harmful/harmless prompts) or bias (sentence pairs).")
HARMFUL = typer.Option(None, help="Harmful prompts (any format of cnt_lens.formats; default: the bundled set).")
HARMLESS = typer.Option(None, help="Harmless prompts; over-refusal is measured on them (XSTest: its safe prompts).")
PAIRS = typer.Option(None, help="Stereotype / anti-stereotype pairs for --behaviour bias (CrowS-Pairs, StereoSet, …).")
FORMAT = typer.Option(None, "--format", help="Format of every prompt file given (default: detected from its columns).")
COLUMN = typer.Option(None, help="The text column of generic csv/jsonl prompt files.")
SPLIT_SEED = typer.Option(0, help="Seed of the hash split (60/20/20) of records without a split field.")
DEVICE = typer.Option(None, help="torch device for the models, e.g. cuda (default: cpu).")
DTYPE = typer.Option("float32", help="Weight precision: float32, bfloat16 or float16.")
PROGRESS = typer.Option(True, help="Show progress bars.")


def _dtype(name: str) -> "torch.dtype":
    import torch

    if name not in DTYPES:
        raise typer.BadParameter(f"unknown dtype {name!r}; one of {sorted(set(DTYPES.values()))}", param_hint="--dtype")
    return getattr(torch, DTYPES[name])


def _prompt_sets(behaviour: str, harmful: Optional[Path], harmless: Optional[Path], pairs: Optional[Path],
                 fmt: Optional[str], column: Optional[str], seed: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """The prompt sets of ``behaviour`` (user files, else bundled) and the data record of the run."""
    from .data import default_harmful, default_harmless, load_prompts
    from .formats import describe_file, load_file

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


def _protocol_sets(protocol: str, behaviour: str, bundled: bool, sets: dict[str, Any],
                   record: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``sets`` re-split by ``protocol`` (``split``: as they are; ``cross``: the bundled refusal prompts by family)."""
    from .data import cross_harmful, cross_harmless

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


def _behaviour(behaviour: str, sets: dict[str, Any]) -> Any:
    from . import Refusal, StereotypeBias

    if behaviour == "refusal":
        return Refusal(harmful=sets["harmful"], harmless=sets["harmless"])
    return StereotypeBias(pairs=sets["pairs"])


def _load_pair(donor: str, target: str, device: Optional[str], dtype: str) -> Any:
    from .models import IncompatibleModelsError, load_pair

    try:
        return load_pair(donor, target, device=device, dtype=_dtype(dtype))
    except IncompatibleModelsError as err:
        raise typer.BadParameter(str(err), param_hint="--donor/--target") from None


def _echo_report(report: Any) -> None:
    """The report's table, then (when its prompts mix families) each role's and family's share of the gap."""
    typer.echo(report.table())
    shares = report.shares_table()
    if shares:
        typer.echo("\n" + shares)


def _floats(text: str, name: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated numbers, got {text!r}", param_hint=name) from None


def _names(text: str) -> tuple[str, ...]:
    return () if text.strip().lower() in ("", "none") else tuple(x.strip() for x in text.split(",") if x.strip())


def _check_methods(names: tuple[str, ...], what: str, hint: str) -> None:
    """Refuse scoring-method names that are not registered, before anything is loaded."""
    from .scoring import METHODS

    bad = [m for m in names if m not in METHODS]
    if bad:
        raise typer.BadParameter(f"unknown {what} {bad}; one of {list(METHODS)}", param_hint=hint)


def _fresh_out(out: Path, overwrite: bool) -> None:
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise typer.BadParameter(f"{out} exists and is not empty; choose a new directory or pass --overwrite to write "
                                 "into it (a run stopped there continues from its resume/ folder)", param_hint="--out")


# --------------------------------------------------------------------------- any pair


@app.command(epilog=_examples('cnt-lens transfer --donor my-org/safe-7b --target my-org/base-7b --out runs/mine', 'cnt-lens transfer --donor D --target T --harmful my_harmful.csv --harmless xstest.csv --out runs/mine', 'cnt-lens transfer --donor D --target T --behaviour bias --pairs crows_pairs.csv --out runs/bias', 'cnt-lens transfer --donor D --target T --rounds 0 --baselines all --out runs/compare'))
def transfer(
    donor: str = typer.Option(..., help="Model that has the behaviour: hub name, HF directory, .gguf file or "
                              "smollm2-135m-instruct."),
    target: str = typer.Option(..., help="Model to give it to (same architecture and shapes as the donor)."),
    out: Path = typer.Option(..., help="Run directory to write (metrics, patch, patched_model/, report.html)."),
    behaviour: str = BEHAVIOUR,
    harmful: Optional[Path] = HARMFUL,
    harmless: Optional[Path] = HARMLESS,
    pairs: Optional[Path] = PAIRS,
    fmt: Optional[str] = FORMAT,
    column: Optional[str] = COLUMN,
    split_seed: int = SPLIT_SEED,
    budget: float = typer.Option(0.05, help="Largest share of all MLP neurons the search may use."),
    goal: float = typer.Option(0.9, help="Share of the donor–target gap to close on validation."),
    alphas: str = typer.Option("2,4,6,8", help="Transplant strengths searched on validation (alpha: how many "
                               "times the donor's own change is added; 1 = the donor's weights)."),
    method: str = typer.Option("weight_attribution", help="Main neuron ranking (cnt_lens.METHODS)."),
    rounds: int = typer.Option(8, help="Re-scoring rounds of the main ranking, as the demo (0 = one pass: "
                               "faster, usually a larger set)."),
    baselines: str = typer.Option("random", help="Comma-separated baselines at the same budget, none, or all "
                                  "(attribution, activation_contrast, wanda, snip, weight_diff, nlsr_drift, random)."),
    device: Optional[str] = DEVICE,
    dtype: str = DTYPE,
    batch_size: Optional[int] = typer.Option(None, min=1, help="Prompts per generation batch (default: TransferConfig's; "
                                              "lower it for a large model on a small device)."),
    screen: bool = typer.Option(True, help="Decide search points by cheap estimates and evaluate in full only "
                                "the points that matter (--no-screen: every point in full)."),
    protocol: str = typer.Option("split", help="split: each prompt set's own splits (the bundled harmful test "
                                 "adds AdvBench and three framings no choice saw); cross (bundled refusal prompts "
                                 "only): neurons on the bundled set, k and alpha on AdvBench, the framings held out."),
    overwrite: bool = typer.Option(False, help="Write into a non-empty --out; a run stopped there continues, "
                                   "reusing every result its resume/ folder holds."),
    progress: bool = PROGRESS,
) -> None:
    """Transfer a behaviour from any donor into any compatible target.

    Scores every MLP neuron on train, searches the minimal set and alpha on validation, compares the
    baselines at the same budget, reports on test, and writes the run directory (as the demo does).
    With the bundled refusal prompts the test report sets the family the choices were made on beside
    families no choice saw (``--protocol cross`` chooses k and alpha on another family as well).
    """
    from .behaviours import Utility
    from .constraints import for_behaviour
    from .pipeline import TransferConfig
    from .runs import run_transfer

    _fresh_out(out, overwrite)
    chosen = TransferConfig.baselines if baselines.strip().lower() == "all" else _names(baselines)
    _check_methods((method, *chosen), "method(s)", "--method/--baselines")
    sets, data = _prompt_sets(behaviour, harmful, harmless, pairs, fmt, column, split_seed)
    sets, data = _protocol_sets(protocol, behaviour, harmful is None and harmless is None, sets, data)
    b = _behaviour(behaviour, sets)
    config = TransferConfig(method=method, baselines=chosen, goal=goal, alphas=_floats(alphas, "--alphas"),
                            max_fraction=budget, screen=screen, **({"batch_size": batch_size} if batch_size is not None else {}),
                            extra={"donor": donor, "target": target, "dtype": DTYPES.get(dtype, dtype)})
    with profile() as prof:
        with stage("load models"):
            pair = _load_pair(donor, target, device, dtype)
        report = run_transfer(pair, b, out, side_effects=[Utility()], constraint=for_behaviour(b.headline),
                              config=config, rounds=rounds, contrast=0.5 if behaviour == "refusal" else 0.0,
                              data=data, progress=progress)
        prof.save(out / "timings.json")
    _echo_report(report)
    typer.echo(prof.table())
    typer.echo(f"wrote {out}/ (metrics.json, patch.safetensors, patched_model/, report.html, timings.json) "
               f"in {prof.total():.0f} s")


@app.command(epilog=_examples('cnt-lens score --donor D --target T --out runs/scores', 'cnt-lens score --donor D --target T --method attribution --top 50 --out runs/scores'))
def score(
    donor: str = typer.Option(..., help="Model that has the behaviour (hub name, directory, .gguf, bundled alias)."),
    target: str = typer.Option(..., help="Model to give it to."),
    out: Path = typer.Option(..., help="Directory for <method>.safetensors and top_neurons.json."),
    behaviour: str = BEHAVIOUR,
    harmful: Optional[Path] = HARMFUL,
    harmless: Optional[Path] = HARMLESS,
    pairs: Optional[Path] = PAIRS,
    fmt: Optional[str] = FORMAT,
    column: Optional[str] = COLUMN,
    split_seed: int = SPLIT_SEED,
    method: str = typer.Option("weight_attribution", help="Scoring method (cnt_lens.METHODS)."),
    top: int = typer.Option(20, help="How many top neurons to print."),
    device: Optional[str] = DEVICE,
    dtype: str = DTYPE,
    overwrite: bool = typer.Option(False, help="Write into a non-empty --out."),
    progress: bool = PROGRESS,
) -> None:
    """Score every MLP neuron of a pair on the train split (no search, no evaluation)."""
    from .files import atomic_write_text
    from .scoring import METHODS
    from .scoring import score as score_pair

    _fresh_out(out, overwrite)
    if method not in METHODS:
        raise typer.BadParameter(f"unknown method {method!r}; one of {list(METHODS)}", param_hint="--method")
    sets, data = _prompt_sets(behaviour, harmful, harmless, pairs, fmt, column, split_seed)
    pair = _load_pair(donor, target, device, dtype)
    s = score_pair(pair, _behaviour(behaviour, sets), method, split="train", progress=progress)
    out.mkdir(parents=True, exist_ok=True)
    s.save(out / f"{method}.safetensors")
    ranked = s.ranked()
    flat = ranked.flatten().topk(min(top, ranked.numel()))
    rows = [{"layer": i // ranked.shape[1], "neuron": i % ranked.shape[1], "score": float(v)}
            for v, i in zip(flat.values.tolist(), flat.indices.tolist())]
    atomic_write_text(out / "top_neurons.json", json.dumps({"method": method, "data": data, "top": rows}, indent=1))
    for r in rows:
        typer.echo(f"L{r['layer']:>3d} N{r['neuron']:>6d}  {r['score']:+.4g}")
    typer.echo(f"wrote {out}/{method}.safetensors and top_neurons.json")


@app.command(epilog=_examples('cnt-lens measure smollm2-135m-instruct', 'cnt-lens measure runs/demo/patched_model --split test --json runs/demo/measured.json'))
def measure(
    model: str = typer.Argument(..., help="Model source: hub name, directory, .gguf or smollm2-135m-instruct."),
    split: str = typer.Option("test", help="train, validation, test or all."),
    harmful: Optional[Path] = HARMFUL,
    harmless: Optional[Path] = HARMLESS,
    pairs: Optional[Path] = PAIRS,
    fmt: Optional[str] = FORMAT,
    column: Optional[str] = COLUMN,
    split_seed: int = SPLIT_SEED,
    device: Optional[str] = DEVICE,
    dtype: str = DTYPE,
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the numbers (and the data record) here."),
    progress: bool = PROGRESS,
) -> None:
    """Refusal, stereotype bias and utility numbers of one model (rates with their 95% interval and n)."""
    from . import Utility, load_model
    from .evaluate import measure as measure_model
    from .files import atomic_write_text
    from .stats import format_rate, is_companion

    refusal_sets, data = _prompt_sets("refusal", harmful, harmless, None, fmt, column, split_seed)
    bias_sets, bias_data = _prompt_sets("bias", None, None, pairs, fmt, column, split_seed)
    m = load_model(model, device=device, dtype=_dtype(dtype))
    behaviours = [_behaviour("refusal", refusal_sets), _behaviour("bias", bias_sets), Utility()]
    numbers = measure_model(m, behaviours, None if split == "all" else split, progress=progress)
    for k, v in numbers.items():
        if not is_companion(k) and isinstance(v, float):
            typer.echo(f"{k:>18s}  {format_rate(numbers, k, digits=4)}")
    if json_out is not None:
        atomic_write_text(json_out, json.dumps({**numbers, "split": split, "data": {**data, **bias_data}}, indent=1))


def _same_place(a: str | Path, b: str | Path) -> bool:
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


@app.command(epilog=_examples('cnt-lens transplant runs/demo/patch.safetensors smollm2-135m-instruct --out runs/patched', 'cnt-lens transplant runs/demo/patch.safetensors smollm2-135m-instruct --alpha 2 --out runs/patched-a2'))
def transplant(
    patch: Path = typer.Argument(..., help="A saved patch (.safetensors)."),
    model: str = typer.Argument(..., help="Model to patch (any model of the patch's shapes)."),
    out: Path = typer.Option(..., help="Directory for the patched HF checkpoint (must not exist)."),
    alpha: Optional[float] = typer.Option(None, help="Override the patch's alpha (a finite number)."),
    overwrite: bool = typer.Option(False, help="Replace an existing --out directory (never the source model)."),
) -> None:
    """Apply a saved patch to a model and export the result as a standard HF checkpoint."""
    from . import NeuronPatch, export_hf, load_model

    if _same_place(out, model):
        raise typer.BadParameter(f"--out {out} is the source model {model}; write the patched model elsewhere",
                                 param_hint="--out")
    if out.exists() and not overwrite:
        raise typer.BadParameter(f"{out} exists; choose a new directory or pass --overwrite", param_hint="--out")
    m = load_model(model)
    p = NeuronPatch.load(patch, m)
    if alpha is not None:
        try:
            p = p.with_alpha(alpha)
        except ValueError as err:
            raise typer.BadParameter(str(err), param_hint="--alpha") from None
    p.apply(m)
    export_hf(m, out, overwrite=overwrite)
    typer.echo(f"applied {p.n} neurons (alpha {p.alpha}) and wrote {out}")


@app.command(epilog=_examples('cnt-lens report runs/demo', 'cnt-lens report runs/demo --application enhance'))
def report(
    run_dir: Path = typer.Argument(..., help="A run directory written by `cnt-lens demo` or `cnt-lens run`."),
    application: Optional[str] = typer.Option(None, help="Recompute the neuron cards with this application's "
                                              "models (loads the bundled model and cached recipes)."),
) -> None:
    """Rebuild ``report.html`` from a run directory (metrics.json, patch, scores, cards.json)."""
    from .report import write_report

    if application is None:
        typer.echo(f"wrote {write_report(run_dir)}")
        return
    from .experiments.applications import APPLICATIONS
    from .models import BUNDLED_MODEL, load_model

    if application not in APPLICATIONS:
        raise typer.BadParameter(f"unknown application {application!r}; one of {sorted(APPLICATIONS)}",
                                 param_hint="--application")
    app_ = APPLICATIONS[application]
    pair = app_.build(load_model(BUNDLED_MODEL))
    typer.echo(f"wrote {write_report(run_dir, pair=pair, behaviour=app_.behaviour())}")


if __name__ == "__main__":  # pragma: no cover
    app()
