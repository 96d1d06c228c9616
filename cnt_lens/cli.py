"""The ``cnt-lens`` command line (typer: typed options, help text and errors for free).

    cnt-lens demo --out runs/demo          # the main job, offline, on the bundled SmolLM2
    cnt-lens measure smollm2-135m-instruct # behaviour numbers of any model
    cnt-lens transplant PATCH MODEL --out DIR
    cnt-lens report runs/demo              # rebuild report.html from a run directory
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.split("\n\n")[0])


def _refusal_constraint(point: dict, reference: dict) -> bool:
    """Demo acceptance: no more harmless refusal than the donor, utility NLL ≤ 1% above the target's."""
    return (point["refusal_harmless"] <= reference["donor"]["refusal_harmless"] + 1e-9
            and point["utility_nll"] <= 1.01 * reference["target"]["utility_nll"])


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), help="Run directory to write."),
    goal: float = typer.Option(0.9, help="Fraction of the donor–target refusal gap to close (validation)."),
    max_fraction: float = typer.Option(0.05, help="Largest neuron budget searched, as a fraction of all MLP neurons."),
    alphas: str = typer.Option("1,2,4,8", help="Comma-separated transplant scales to search."),
    baselines: str = typer.Option("attribution,activation_contrast,wanda,snip,weight_diff,nlsr_drift,random",
                                  help="Comma-separated baseline methods, evaluated at the same budget."),
    max_new_tokens: int = typer.Option(16, help="Greedy tokens per response for the refusal matcher."),
    progress: bool = typer.Option(True, help="Show progress bars."),
) -> None:
    """Transfer refusal from a safety-tuned donor into the bundled SmolLM2 with a minimal neuron set."""
    from . import BUNDLED_MODEL, ModelPair, Refusal, Utility, export_hf, load_model
    from .pipeline import TransferConfig, transfer
    from .recipes import safety_tune
    from .report import write_report

    t0 = time.time()
    out.mkdir(parents=True, exist_ok=True)
    typer.echo(f"loading {BUNDLED_MODEL} (offline)")
    target = load_model(BUNDLED_MODEL)
    typer.echo("building the safety-tuned donor (cached after the first run)")
    donor = safety_tune(target)
    pair = ModelPair(donor=donor, target=target)
    config = TransferConfig(goal=goal, max_fraction=max_fraction, alphas=tuple(float(a) for a in alphas.split(",")),
                            baselines=tuple(b for b in baselines.split(",") if b))
    report, patch, scores = transfer(pair, Refusal(max_new_tokens=max_new_tokens), side_effects=[Utility()],
                                     constraint=_refusal_constraint, config=config, out_dir=out, progress=progress)
    report.extra["wall_time_s"] = round(time.time() - t0, 1)
    report.save(out / "metrics.json")
    if patch is not None:
        patch.apply(pair.target)
        export_hf(pair.target, out / "patched_model")
        patch.revert(pair.target)
    write_report(out, pair=pair, scores=scores)
    typer.echo(report.table(["refusal_harmful", "refusal_harmless", "utility_nll", "mc_accuracy"]))
    typer.echo(f"wrote {out}/metrics.json, patch.safetensors, patched_model/, report.html "
               f"in {report.extra['wall_time_s']:.0f} s")


@app.command()
def measure(
    model: str = typer.Argument(..., help="Model source: hub name, directory, .gguf or smollm2-135m-instruct."),
    split: str = typer.Option("test", help="train, validation or test."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the numbers here."),
) -> None:
    """Refusal, stereotype bias and utility numbers of one model on the bundled sets."""
    from . import Refusal, StereotypeBias, Utility, load_model
    from .evaluate import measure as measure_model

    m = load_model(model)
    numbers = measure_model(m, [Refusal(), StereotypeBias(), Utility()], split, progress=True)
    for k, v in numbers.items():
        typer.echo(f"{k:>18s}  {v:.4f}")
    if json_out is not None:
        json_out.write_text(json.dumps(numbers, indent=1))


@app.command()
def transplant(
    patch: Path = typer.Argument(..., help="A saved patch (.safetensors)."),
    model: str = typer.Argument(..., help="Model to patch (any model of the patch's shapes)."),
    out: Path = typer.Option(..., help="Directory for the patched HF checkpoint."),
    alpha: Optional[float] = typer.Option(None, help="Override the patch's alpha."),
) -> None:
    """Apply a saved patch to a model and export the result as a standard HF checkpoint."""
    from . import NeuronPatch, export_hf, load_model

    m = load_model(model)
    p = NeuronPatch.load(patch, m)
    if alpha is not None:
        p = p.with_alpha(alpha)
    p.apply(m)
    export_hf(m, out)
    typer.echo(f"applied {p.n} neurons (alpha {p.alpha}) and wrote {out}")


@app.command()
def report(run_dir: Path = typer.Argument(..., help="A run directory written by `cnt-lens demo`.")) -> None:
    """Rebuild ``report.html`` from a run directory's metrics.json, patch and scores."""
    from .report import write_report

    typer.echo(f"wrote {write_report(run_dir)}")


if __name__ == "__main__":  # pragma: no cover
    app()
