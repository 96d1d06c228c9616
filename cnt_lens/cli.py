"""The ``cnt-lens`` command line (typer: typed options, help text and errors for free).

    cnt-lens demo --out runs/demo          # the main job, offline, on the bundled SmolLM2
    cnt-lens run realign --out runs/realign  # enhance | disalign | realign | bias-removal
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


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), help="Run directory to write."),
    device: Optional[str] = typer.Option(None, help="torch device for both models, e.g. cuda (default: cpu)."),
    progress: bool = typer.Option(True, help="Show progress bars."),
) -> None:
    """The main job: transfer refusal from a safety-tuned donor into the bundled SmolLM2 with a
    minimal neuron set, against the baselines (= ``cnt-lens run enhance``)."""
    run(application="enhance", out=out, device=device, progress=progress)


@app.command()
def run(
    application: str = typer.Argument(..., help="enhance | disalign | realign | bias-removal"),
    out: Path = typer.Option(..., help="Run directory to write."),
    device: Optional[str] = typer.Option(None, help="torch device for both models, e.g. cuda (default: cpu)."),
    progress: bool = typer.Option(True, help="Show progress bars."),
) -> None:
    """Run one CNT / NLSR application end to end on the bundled model (see cnt_lens.applications)."""
    from .applications import APPLICATIONS, run_application

    if application not in APPLICATIONS:
        raise typer.BadParameter(f"unknown application {application!r}; one of {sorted(APPLICATIONS)}")
    t0 = time.time()
    report = run_application(application, out, device=device, progress=progress)
    metrics = [k for k in report.target if isinstance(report.target[k], float)]
    typer.echo(report.table(metrics))
    typer.echo(f"wrote {out}/metrics.json, patch.safetensors, patched_model/, report.html in {time.time() - t0:.0f} s")


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


def _same_place(a: str | Path, b: str | Path) -> bool:
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


@app.command()
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


@app.command()
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
    from .applications import APPLICATIONS
    from .models import BUNDLED_MODEL, load_model

    if application not in APPLICATIONS:
        raise typer.BadParameter(f"unknown application {application!r}; one of {sorted(APPLICATIONS)}",
                                 param_hint="--application")
    app_ = APPLICATIONS[application]
    pair = app_.build(load_model(BUNDLED_MODEL))
    typer.echo(f"wrote {write_report(run_dir, pair=pair, behaviour=app_.behaviour())}")


if __name__ == "__main__":  # pragma: no cover
    app()
