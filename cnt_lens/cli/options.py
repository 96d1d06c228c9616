"""Command-line options as data: each is an :class:`Opt`, and :func:`command` turns a list of them into a typer command.

A command's body takes one dict of option values, so no function carries two dozen parameters, and an
option that sets a :class:`~cnt_lens.method.config.TransferConfig` field names it (``setting``): :func:`settings`
collects them for :func:`~cnt_lens.method.config.override`. The option tables below are shared by the commands
that read prompts and models.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import typer

__all__ = ["COMMON_MODEL", "DEVICE", "MAX_KL", "Opt", "PROGRESS", "PROMPT_FILES", "SEARCH", "command", "settings"]


@dataclass(frozen=True)
class Opt:
    """One option (or, with ``argument``, a positional argument) of a command.

    ``setting``: the config fields it sets (``"search.goal"``), after ``parse`` (e.g. a comma list to a
    tuple); ``flags`` replaces the option's own name on the command line (``("--json",)``).
    """

    name: str
    kind: Any
    default: Any
    help: str
    setting: tuple[str, ...] = ()
    parse: Callable[[Any], Any] | None = None
    flags: tuple[str, ...] = ()
    argument: bool = False
    min: int | None = None

    def parameter(self) -> inspect.Parameter:
        """The typer parameter of this option."""
        info = (typer.Argument(self.default, help=self.help) if self.argument else
                typer.Option(self.default, *self.flags, help=self.help, **({"min": self.min} if self.min else {})))
        return inspect.Parameter(self.name, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=self.kind)


def command(app: typer.Typer, options: list[Opt], examples: list[str]) -> Callable:
    """Register ``fn(values: dict)`` as the command ``fn.__name__`` with ``options`` and an examples epilog.

    Returns ``fn`` itself, so one command's body can run another's (``demo`` runs ``run``'s).
    """
    def register(fn: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
        def callback(**values: Any) -> None:
            fn(values)

        callback.__signature__ = inspect.Signature([o.parameter() for o in options])  # type: ignore[attr-defined]
        callback.__doc__, callback.__name__ = fn.__doc__, fn.__name__
        epilog = "**Examples**\n\n" + "\n\n".join(f"`{line}`" for line in examples)
        app.command(name=fn.__name__.replace("_", "-"), epilog=epilog)(callback)
        return fn
    return register


def settings(options: list[Opt], values: Mapping[str, Any]) -> dict[str, Any]:
    """``{"section.field": value}`` of every option in ``options`` that sets the config (parsed; ``None`` kept)."""
    out: dict[str, Any] = {}
    for o in options:
        if o.setting and o.name in values:
            value = values[o.name]
            value = o.parse(value) if o.parse is not None and value is not None else value
            out.update({path: value for path in o.setting})
    return out


DEVICE = Opt("device", Optional[str], None, "torch device for the models, e.g. cuda (default: cpu).")
PROGRESS = Opt("progress", bool, True, "Show progress bars.")
MAX_KL = Opt("max_kl", Optional[float], None, "Accept only search points whose first-token KL from the target, on the "
             "harmless validation prompts, is at most this many nats (default: no bound; every point reads it).",
             setting=("search.max_kl",))
SEARCH = [
    Opt("search", Optional[str], None, "How the search on validation proposes points: bisection (k bisected at each "
        "alpha; the default) or pareto (Optuna's Gaussian-process sampler over k and a continuous alpha against gap closed, first-token KL and "
        "neurons; needs the search extra).", setting=("search.strategy",)),
    Opt("trials", Optional[int], None, "Points the pareto search measures (default: 24).", setting=("search.trials",),
        min=1),
]
PROMPT_FILES = [
    Opt("harmful", Optional[Path], None, "Harmful prompts (any format of cnt_lens.data.formats; default: the bundled set)."),
    Opt("harmless", Optional[Path], None, "Harmless prompts; over-refusal is measured on them (XSTest: its safe "
                                          "prompts)."),
    Opt("pairs", Optional[Path], None, "Stereotype / anti-stereotype pairs for --behaviour bias (CrowS-Pairs, "
                                       "StereoSet, …)."),
    Opt("fmt", Optional[str], None, "Format of every prompt file given (default: detected from its columns).",
        flags=("--format",)),
    Opt("column", Optional[str], None, "The text column of generic csv/jsonl prompt files."),
    Opt("split_seed", int, 0, "Seed of the hash split (60/20/20) of records without a split field."),
]
COMMON_MODEL = [DEVICE, Opt("dtype", str, "float32", "Weight precision: float32, bfloat16 or float16.")]
