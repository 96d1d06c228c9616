"""The ``cnt-lens`` commands: each one a body over a dict of option values (:mod:`~cnt_lens.cli.options`)."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Optional

import typer

from cnt_lens.cli import inputs
from cnt_lens.cli.options import COMMON_MODEL, DEVICE, MAX_KL, PROGRESS, PROMPT_FILES, SEARCH, Opt, command, settings
from cnt_lens.core.errors import CntLensError
from cnt_lens.core.timing import profile, stage, timings_table

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


HELP = "The ``cnt-lens`` command line (typer: typed options, help text and errors for free)."
app = _App(add_completion=False, no_args_is_help=True, help=HELP, pretty_exceptions_enable=False,
           rich_markup_mode="markdown")  # docstrings' ``code`` renders as code, not as raw backticks


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



# --------------------------------------------------------------------------- the applications

def _methods(text: str) -> tuple[str, ...]:
    """``--baselines``' text: comma-separated methods, ``none`` or ``all``."""
    from cnt_lens.method.config import ALL_BASELINES

    return ALL_BASELINES if text.strip().lower() == "all" else inputs.names(text)


RUN_OPTIONS = [
    Opt("application", str, ..., "enhance | disalign | delete-refusal | realign | bias-removal", argument=True),
    Opt("out", Path, ..., "Run directory to write."),
    Opt("model", str, "smollm2-135m-instruct", "Base model the recipes tune: an offline alias (smollm2-135m-instruct, "
        "qwen2.5-coder-0.5b-instruct), hub name, directory or .gguf."),
    Opt("rounds", Optional[int], None, "Re-scoring rounds of the main ranking (0 = one pass; default: the "
        "application's).", setting=("ranking.rounds",)),
    Opt("stop_overlap", Optional[float], None, "Stop re-scoring once a round would pick at least this share of the "
        "remaining budget as the round before (e.g. 0.9; default: the application's).",
        setting=("ranking.stop_overlap",)),
    Opt("baselines", Optional[str], None, "Comma-separated baselines, none, or all (default: all seven).",
        setting=("baselines.methods",), parse=_methods),
    Opt("alphas", Optional[str], None, "Transplant strengths searched on validation, e.g. 1,2,4 (default: the "
        "application's).", setting=("search.alphas",), parse=lambda t: inputs.floats(t, "--alphas")),
    Opt("max_fraction", Optional[float], None, "Largest budget searched, as a fraction of all MLP neurons (default: "
        "the application's).", setting=("search.max_fraction",)),
    MAX_KL, *SEARCH,
    Opt("screen", bool, True, "Decide search points by cheap estimates and evaluate in full only the points that "
        "matter (--no-screen: every point in full).", setting=("search.screen",)),
    Opt("protocol", str, "split", "split: neurons, k and alpha on the bundled prompts' own splits, AdvBench and three "
        "framings held out for the report; cross: neurons on the bundled prompts, k and alpha on AdvBench, the "
        "framings held out."),
    Opt("objective", str, "opening", "What refusal rankings read: opening (log-odds of a refusal opening) or "
        "continuation (log p of the refusing model's own refusal sentence)."),
    Opt("random_seeds", Optional[int], None, "Seeds of the random baseline evaluated on test (default: 5).",
        setting=("baselines.random_seeds",), min=1),
    Opt("search_baselines", bool, True, "Give every baseline the main method's own search over k and alpha as well "
        "(--no-search-baselines: each baseline only picks alpha at the main method's k).", setting=("baselines.search",)),
    DEVICE, PROGRESS,
]


@command(app, RUN_OPTIONS, ["cnt-lens run enhance --out runs/enhance", "cnt-lens run disalign --out runs/disalign "
                            "--rounds 4", "cnt-lens run delete-refusal --model qwen2.5-coder-0.5b-instruct --out "
                            "runs/qwen-delete --baselines random"])
def run(values: dict[str, Any]) -> None:
    """Run one CNT / NLSR application end to end (see cnt_lens.experiments.applications)."""
    from cnt_lens.experiments.applications import APPLICATIONS, OBJECTIVES, PROTOCOLS, run_application
    from cnt_lens.method.config import override

    checks = [("application", APPLICATIONS, None), ("protocol", PROTOCOLS, "--protocol"),
              ("objective", OBJECTIVES, "--objective")]
    for name, known, hint in checks:
        if values[name] not in known:
            raise typer.BadParameter(f"unknown {name} {values[name]!r}; one of {sorted(known)}", param_hint=hint)
    changes = settings(RUN_OPTIONS, values)
    inputs.check_methods(changes["baselines.methods"] or (), "baseline(s)", "--baselines")
    config = override(APPLICATIONS[values["application"]].config(values["model"]), changes)
    t0, out = time.time(), values["out"]
    report = run_application(values["application"], out, config, model=values["model"], protocol=values["protocol"],
                             objective=values["objective"], device=values["device"], progress=values["progress"])
    inputs.echo_report(report)
    typer.echo(timings_table(out / "timings.json"))
    typer.echo(f"wrote {out}/metrics.json, patch.safetensors, patched_model/, report.html in {time.time() - t0:.0f} s")


@command(app, [Opt("out", Path, Path("runs/demo"), "Run directory to write."),
               Opt("baselines", str, "random", "Baselines to compare with: comma-separated, none, or all (the seven "
                   "of `cnt-lens run enhance`, each also given the main method's own search)."),
               Opt("device", Optional[str], None, "torch device for both models, e.g. cuda (default: cpu)."), PROGRESS],
         ["cnt-lens demo --out runs/demo", "cnt-lens demo --out runs/demo-all --baselines all",
          "cnt-lens demo --out runs/demo-gpu --device cuda"])
def demo(values: dict[str, Any]) -> None:
    """The main job: transfer refusal into the bundled SmolLM2 with a minimal neuron set.

    The donor is the cached safety tune of the same model. Neurons, k and alpha are chosen on the
    bundled harmful prompts; the test report reads them beside AdvBench's requests and three framings
    (role-play, writing, backstory) that no choice saw, each with its share of the donor–target gap.
    The patch — ranking, search and test numbers — is the one ``cnt-lens run enhance`` finds; the demo
    compares it with the random baseline at the same budget and alpha (five seeds) by default, and
    with all seven baselines, each with its own search (= ``cnt-lens run enhance``, several times
    longer), with ``--baselines all``.
    """
    every = values["baselines"].strip().lower() == "all"
    run({**{o.name: o.default for o in RUN_OPTIONS}, "application": "enhance", "out": values["out"], "device": values["device"],
         "progress": values["progress"], "baselines": None if every else values["baselines"] or "none",
         "search_baselines": every})


# --------------------------------------------------------------------------- any pair

PROMPTS = [Opt("behaviour", str, "refusal", "refusal (harmful/harmless prompts) or bias (sentence pairs).",
               flags=("--behaviour",)), *PROMPT_FILES]
PAIR = [Opt("donor", str, ..., "Model that has the behaviour: hub name, HF directory, .gguf file or bundled alias."),
        Opt("target", str, ..., "Model to give it to (same architecture and shapes as the donor).")]
TRANSFER_OPTIONS = [
    *PAIR, Opt("out", Path, ..., "Run directory to write (metrics, patch, patched_model/, report.html)."), *PROMPTS,
    Opt("budget", float, 0.05, "Largest share of all MLP neurons the search may use.", setting=("search.max_fraction",)),
    Opt("goal", float, 0.9, "Share of the donor–target gap to close on validation.", setting=("search.goal",)),
    MAX_KL, *SEARCH,
    Opt("alphas", str, "2,4,6,8", "Transplant strengths searched on validation (alpha: how many times the donor's "
        "own change is added; 1 = the donor's weights).", setting=("search.alphas",),
        parse=lambda t: inputs.floats(t, "--alphas")),
    Opt("method", str, "weight_attribution", "Main neuron ranking (cnt_lens.METHODS).", setting=("ranking.method",)),
    Opt("rounds", int, 8, "Re-scoring rounds of the main ranking, as the demo (0 = one pass: faster, usually a larger "
        "set).", setting=("ranking.rounds",)),
    Opt("stop_overlap", Optional[float], None, "Stop re-scoring once a round would pick at least this share of the "
        "remaining budget as the round before (e.g. 0.9; default: every round).", setting=("ranking.stop_overlap",)),
    Opt("baselines", str, "random", "Comma-separated baselines at the same budget, none, or all (attribution, "
        "activation_contrast, wanda, snip, weight_diff, nlsr_drift, random).", setting=("baselines.methods",),
        parse=_methods),
    *COMMON_MODEL,
    Opt("batch_size", Optional[int], None, "Prompts per generation batch (default: TransferConfig's; lower it for a "
        "large model on a small device).", setting=("search.batch_size", "evaluation.batch_size"), min=1),
    Opt("screen", bool, True, "Decide search points by cheap estimates and evaluate in full only the points that "
        "matter (--no-screen: every point in full).", setting=("search.screen",)),
    Opt("protocol", str, "split", "split: each prompt set's own splits (the bundled harmful test adds AdvBench and "
        "three framings no choice saw); cross (bundled refusal prompts only): neurons on the bundled set, k and alpha "
        "on AdvBench, the framings held out."),
    Opt("overwrite", bool, False, "Write into a non-empty --out; a run stopped there continues, reusing every result "
        "its resume/ folder holds."),
    PROGRESS,
]


def _prompts(values: dict[str, Any], behaviour: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The prompt sets and data record the prompt options name (:func:`~cnt_lens.cli.inputs.prompt_sets`)."""
    return inputs.prompt_sets(behaviour, values.get("harmful"), values.get("harmless"), values.get("pairs"),
                              values["fmt"], values["column"], values["split_seed"])


@command(app, TRANSFER_OPTIONS, [
    "cnt-lens transfer --donor my-org/safe-7b --target my-org/base-7b --out runs/mine",
    "cnt-lens transfer --donor D --target T --harmful my_harmful.csv --harmless xstest.csv --out runs/mine",
    "cnt-lens transfer --donor D --target T --behaviour bias --pairs crows_pairs.csv --out runs/bias",
    "cnt-lens transfer --donor D --target T --rounds 0 --baselines all --out runs/compare"])
def transfer(values: dict[str, Any]) -> None:
    """Transfer a behaviour from any donor into any compatible target.

    Scores every MLP neuron on train, searches the minimal set and alpha on validation, compares the
    baselines at the same budget, reports on test, and writes the run directory (as the demo does).
    With the bundled refusal prompts the test report sets the family the choices were made on beside
    families no choice saw (``--protocol cross`` chooses k and alpha on another family as well).
    """
    from cnt_lens.behaviours.constraints import for_behaviour
    from cnt_lens.behaviours.utility import Utility
    from cnt_lens.method.config import TransferConfig, override
    from cnt_lens.workflow.runs import run_transfer

    out, behaviour = values["out"], values["behaviour"]
    inputs.fresh_out(out, values["overwrite"])
    changes = settings(TRANSFER_OPTIONS, values)
    inputs.check_methods((values["method"], *changes["baselines.methods"]), "method(s)", "--method/--baselines")
    sets, data = _prompts(values, behaviour)
    bundled = values["harmful"] is None and values["harmless"] is None
    sets, data = inputs.protocol_sets(values["protocol"], behaviour, bundled, sets, data)
    b = inputs.behaviour_of(behaviour, sets)
    about = {"donor": values["donor"], "target": values["target"],
             "dtype": inputs.DTYPES.get(values["dtype"], values["dtype"])}
    config = override(TransferConfig(about=about), {**changes, "ranking.contrast": 0.5 if behaviour == "refusal" else 0.0})
    with profile():
        with stage("load models"):
            pair = inputs.load_pair_checked(values["donor"], values["target"], values["device"], values["dtype"])
        report = run_transfer(pair, b, out, config, side_effects=[Utility()], constraint=for_behaviour(b.headline),
                              data=data, progress=values["progress"])
    inputs.echo_report(report)
    typer.echo(timings_table(out / "timings.json"))
    typer.echo(f"wrote {out}/ (metrics.json, patch.safetensors, patched_model/, report.html, timings.json) "
               f"in {report.extra['wall_time_s']:.0f} s")


@command(app, [*PAIR, Opt("out", Path, ..., "Directory for <method>.safetensors and top_neurons.json."), *PROMPTS,
               Opt("method", str, "weight_attribution", "Scoring method (cnt_lens.METHODS)."),
               Opt("top", int, 20, "How many top neurons to print."), *COMMON_MODEL,
               Opt("overwrite", bool, False, "Write into a non-empty --out."), PROGRESS],
         ["cnt-lens score --donor D --target T --out runs/scores",
          "cnt-lens score --donor D --target T --method attribution --top 50 --out runs/scores"])
def score(values: dict[str, Any]) -> None:
    """Score every MLP neuron of a pair on the train split (no search, no evaluation)."""
    from cnt_lens.core.files import atomic_write_text
    from cnt_lens.method.scoring import METHODS
    from cnt_lens.method.scoring import score as score_pair

    out, method = values["out"], values["method"]
    inputs.fresh_out(out, values["overwrite"])
    if method not in METHODS:
        raise typer.BadParameter(f"unknown method {method!r}; one of {list(METHODS)}", param_hint="--method")
    sets, data = _prompts(values, values["behaviour"])
    pair = inputs.load_pair_checked(values["donor"], values["target"], values["device"], values["dtype"])
    s = score_pair(pair, inputs.behaviour_of(values["behaviour"], sets), method, split="train",
                   progress=values["progress"])
    out.mkdir(parents=True, exist_ok=True)
    s.save(out / f"{method}.safetensors")
    ranked = s.ranked()
    flat = ranked.flatten().topk(min(values["top"], ranked.numel()))
    rows = [{"layer": i // ranked.shape[1], "neuron": i % ranked.shape[1], "score": float(v)}
            for v, i in zip(flat.values.tolist(), flat.indices.tolist())]
    atomic_write_text(out / "top_neurons.json", json.dumps({"method": method, "data": data, "top": rows}, indent=1))
    for r in rows:
        typer.echo(f"L{r['layer']:>3d} N{r['neuron']:>6d}  {r['score']:+.4g}")
    typer.echo(f"wrote {out}/{method}.safetensors and top_neurons.json")


@command(app, [Opt("model", str, ..., "Model source: hub name, directory, .gguf or smollm2-135m-instruct.",
                   argument=True), Opt("split", str, "test", "train, validation, test or all."), *PROMPT_FILES,
               *COMMON_MODEL, Opt("json_out", Optional[Path], None, "Also write the numbers (and the data record) here.",
                                  flags=("--json",)), PROGRESS],
         ["cnt-lens measure smollm2-135m-instruct",
          "cnt-lens measure runs/demo/patched_model --split test --json runs/demo/measured.json"])
def measure(values: dict[str, Any]) -> None:
    """Refusal, stereotype bias and utility numbers of one model (rates with their 95% interval and n)."""
    from cnt_lens import Utility, load_model
    from cnt_lens.core.files import atomic_write_text
    from cnt_lens.core.stats import format_rate, is_companion
    from cnt_lens.method.evaluate import measure as measure_model

    refusal_sets, data = _prompts({**values, "pairs": None}, "refusal")
    bias_sets, bias_data = _prompts({**values, "harmful": None, "harmless": None}, "bias")
    m = load_model(values["model"], device=values["device"], dtype=inputs.dtype_of(values["dtype"]))
    behaviours = [inputs.behaviour_of("refusal", refusal_sets), inputs.behaviour_of("bias", bias_sets), Utility()]
    split = values["split"]
    numbers = measure_model(m, behaviours, None if split == "all" else split, progress=values["progress"])
    for k, v in numbers.items():
        if not is_companion(k) and isinstance(v, float):
            typer.echo(f"{k:>18s}  {format_rate(numbers, k, digits=4)}")
    if values["json_out"] is not None:
        atomic_write_text(values["json_out"], json.dumps({**numbers, "split": split, "data": {**data, **bias_data}},
                                                         indent=1))


@command(app, [Opt("patch", Path, ..., "A saved patch (.safetensors).", argument=True),
               Opt("model", str, ..., "Model to patch (any model of the patch's shapes).", argument=True),
               Opt("out", Path, ..., "Directory for the patched HF checkpoint (must not exist)."),
               Opt("alpha", Optional[float], None, "Override the patch's alpha (a finite number)."),
               Opt("overwrite", bool, False, "Replace an existing --out directory (never the source model).")],
         ["cnt-lens transplant runs/demo/patch.safetensors smollm2-135m-instruct --out runs/patched",
          "cnt-lens transplant runs/demo/patch.safetensors smollm2-135m-instruct --alpha 2 --out runs/patched-a2"])
def transplant(values: dict[str, Any]) -> None:
    """Apply a saved patch to a model and export the result as a standard HF checkpoint."""
    from cnt_lens import NeuronPatch, export_hf, load_model

    out, model = values["out"], values["model"]
    if inputs.same_place(out, model):
        raise typer.BadParameter(f"--out {out} is the source model {model}; write the patched model elsewhere",
                                 param_hint="--out")
    if out.exists() and not values["overwrite"]:
        raise typer.BadParameter(f"{out} exists; choose a new directory or pass --overwrite", param_hint="--out")
    m = load_model(model)
    p = NeuronPatch.load(values["patch"], m)
    if values["alpha"] is not None:
        try:
            p = p.with_alpha(values["alpha"])
        except ValueError as err:
            raise typer.BadParameter(str(err), param_hint="--alpha") from None
    p.apply(m)
    export_hf(m, out, overwrite=values["overwrite"])
    typer.echo(f"applied {p.n} neurons (alpha {p.alpha}) and wrote {out}")


@command(app, [Opt("run_dir", Path, ..., "A run directory written by `cnt-lens demo` or `cnt-lens run`.", argument=True),
               Opt("application", Optional[str], None, "Recompute the neuron cards with this application's models "
                   "(loads the bundled model and cached recipes).")],
         ["cnt-lens report runs/demo", "cnt-lens report runs/demo --application enhance"])
def report(values: dict[str, Any]) -> None:
    """Rebuild ``report.html`` from a run directory (metrics.json, patch, scores, cards.json)."""
    from cnt_lens.show.report import write_report

    run_dir, application = values["run_dir"], values["application"]
    if application is None:
        typer.echo(f"wrote {write_report(run_dir)}")
        return
    from cnt_lens.experiments.applications import APPLICATIONS
    from cnt_lens.models.loading import BUNDLED_MODEL, load_model

    if application not in APPLICATIONS:
        raise typer.BadParameter(f"unknown application {application!r}; one of {sorted(APPLICATIONS)}",
                                 param_hint="--application")
    app_ = APPLICATIONS[application]
    pair = app_.build(load_model(BUNDLED_MODEL))
    typer.echo(f"wrote {write_report(run_dir, pair=pair, behaviour=app_.behaviour())}")
