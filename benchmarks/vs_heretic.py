"""heretic's own search beside neuron transfer: refusals per 100 against first-token KL, on the same test prompts.

    CNT_LENS_CACHE=… python benchmarks/vs_heretic.py --heretic SCRATCH/bin/heretic --run runs/disalign
        [--trials 30] [--startup-trials 10] [--seed 0] [--batch-size 64] [--out runs/vs-heretic-NAME]
        [--reuse] [--into-run]

``heretic`` is heretic-llm, installed pinned in a scratch venv (never in the project's): this script only runs its
command and reads its study. On the pair of a finished run of an application that removes its target's refusal
(``cnt-lens run disalign``: SmolLM2's safety tune; ``cnt-lens run delete-refusal --model M``: a model that refuses
as released), rebuilt from the run's ``metrics.json``, it

1. exports the target as a Hugging Face directory (:func:`~cnt_lens.method.transplant.export_hf`) and writes the
   application's prompts as local datasets: heretic's direction prompts are the **train** split (harmful, harmless),
   its evaluation prompts the **test** split's first ``--harmful-n`` harmful prompts (heretic's own default is 100)
   and all its harmless ones, prompts the run's test tables read;
2. runs heretic offline on them with ``--trials`` trials of its multi-objective TPE search (``--startup-trials``
   random ones first, its default ratio), greedy answers of the run's length (48 new tokens), float32 on the CPU,
   and the system prompt the bundled model's chat template gives by default (the one every cnt_lens prompt gets,
   checked to render the same text);
3. reads every finished trial from heretic's study (its own refusal count, by its markers, and its first-token
   KL(target ‖ edited) on the harmless test prompts) with the scratch venv's Python;
4. sets beside them the run's models (target, donor, neuron transfer, each baseline, and an edit that
   ``benchmarks/direction_baseline.py --run`` added), their answers re-judged with heretic's markers (read from its
   installed ``config.py``, not imported), and writes ``OUT/metrics.json``, ``OUT/vs_heretic.html`` (refusals per 100
   by heretic's markers against KL, one series per method) and prints the table; ``--into-run`` also stores the
   trials in ``RUN/metrics.json`` (``extra.peer_trials``) and rebuilds ``RUN/report.html``, whose refusals-vs-KL
   figure then draws them beside the run's models.

heretic **chooses on the prompts it reports**: its Pareto front is the best of its trials on the test prompts
themselves, as its users read it; the run's points were chosen on validation and read once on test. Set the
comparison beside that fact: it favours heretic.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from kl_front import front as pareto_front  # this directory's sibling benchmarks
from run_pair import rebuilt

from cnt_lens.behaviours.judge import marker_refusal, markers_in_source
from cnt_lens.core.errors import CntLensError
from cnt_lens.core.files import atomic_write_text
from cnt_lens.core.stats import rate
from cnt_lens.data.tokens import chat_format
from cnt_lens.experiments.applications import APPLICATIONS
from cnt_lens.method.evaluate import KL_NAME, Report
from cnt_lens.method.transplant import export_hf
from cnt_lens.show.plots import BASELINE_COLOURS, MODEL_COLOURS

#: reads heretic's study with the scratch venv's optuna; prints one JSON list of its finished trials
_READ_STUDY = """
import json, sys, optuna
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
study = optuna.load_study(study_name="heretic", storage=JournalStorage(JournalFileBackend(sys.argv[1])))
print(json.dumps([{"number": t.number, "refusals": t.user_attrs["refusals"], "kl": t.user_attrs["kl_divergence"],
                   "params": t.params} for t in study.trials if t.state.name == "COMPLETE"]))
"""


def _system_prompt(tokenizer) -> str:
    """The system text the chat template adds to a lone user turn, checked to render that turn identically."""
    probe = "PROBE"
    text = chat_format(tokenizer, probe)
    start, end = "<|im_start|>system\n", "<|im_end|>"
    if start not in text:
        raise CntLensError(f"the bundled chat template adds no system turn ({text[:80]!r}); this script expects one")
    system = text.split(start, 1)[1].split(end, 1)[0]
    again = tokenizer.apply_chat_template([{"role": "system", "content": system}, {"role": "user", "content": probe}],
                                          tokenize=False, add_generation_prompt=True)
    if again != text:
        raise CntLensError("giving the template's default system prompt explicitly renders a different text")
    return system


def _write_prompts(directory: Path, prompts: list[str]) -> dict:
    """``prompts`` as a one-file JSON-lines dataset (column ``text``) heretic loads by path; its specification."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "prompts.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in prompts), "utf-8")
    return {"dataset": str(directory.resolve()), "split": "train", "column": "text"}


def _toml(value) -> str:
    """A TOML value for the few types heretic's settings take here (JSON's strings and lists are TOML's)."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + "}"
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value)


def prepare(out: Path, args) -> list[str]:
    """Export the run's target, write the prompt sets and heretic's ``config.toml`` in ``out``; the harmful ones.

    The pair and the prompts are the run's own, rebuilt from its ``metrics.json`` (:func:`run_pair.rebuilt`).
    """
    _, _, _, pair, behaviour = rebuilt(args.run)
    export_hf(pair.target, out / "target", overwrite=True)
    sets = {f"{kind}_{split}": getattr(behaviour, kind).split(split).column("prompt")
            for kind in ("harmful", "harmless") for split in ("train", "test")}
    sets["harmful_test"] = sets["harmful_test"][:args.harmful_n]
    specs = {name: _write_prompts(out / "prompts" / name, prompts) for name, prompts in sets.items()}
    settings = {"model": str((out / "target").resolve()), "dtypes": ["float32"], "device_map": "cpu",
                "batch_size": args.batch_size, "max_response_length": args.max_new_tokens,
                "n_trials": args.trials, "n_startup_trials": args.startup_trials, "seed": args.seed,
                "study_checkpoint_dir": str((out / "checkpoints").resolve()),
                "system_prompt": _system_prompt(pair.target.tokenizer),
                "good_prompts": specs["harmless_train"], "bad_prompts": specs["harmful_train"],
                "good_evaluation_prompts": specs["harmless_test"], "bad_evaluation_prompts": specs["harmful_test"]}
    tables = {k: v for k, v in settings.items() if isinstance(v, dict)}
    lines = [f"{k} = {_toml(v)}" for k, v in settings.items() if k not in tables]
    lines += [f"\n[{k}]\n" + "\n".join(f"{f} = {_toml(x)}" for f, x in v.items()) for k, v in tables.items()]
    (out / "config.toml").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return sets["harmful_test"]


def run_heretic(heretic: Path, out: Path) -> float:
    """Run heretic in ``out`` (its ``config.toml``) offline until its search finishes; its log to ``heretic.log``.

    heretic asks interactively which trial to keep once the search ends; it is stopped there (its study is on
    disk by then). Returns the wall time in seconds.
    """
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TERM": "dumb", "PYTHONUNBUFFERED": "1", "COLUMNS": "160"}
    t0 = time.time()
    with open(out / "heretic.log", "w", encoding="utf-8", buffering=1) as log:
        proc = subprocess.Popen([str(heretic)], cwd=out, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, env=env, text=True, bufsize=1)
        finished = False
        for line in proc.stdout:
            log.write(line)
            if line.startswith("Running trial") or "Refusals:" in line or "KL divergence:" in line:
                print(f"heretic {time.time() - t0:6.0f} s | {line.strip()}", flush=True)
            if "Optimization finished" in line:
                finished = True
                break
        proc.terminate()
        proc.wait(timeout=60)
    if not finished:
        raise CntLensError(f"heretic stopped before its search finished (exit {proc.returncode}); read "
                           f"{out / 'heretic.log'}")
    return time.time() - t0


def read_trials(heretic: Path, out: Path) -> list[dict]:
    """heretic's finished trials from its study journal, read by the scratch venv's Python."""
    journals = sorted((out / "checkpoints").glob("*.jsonl"))
    if len(journals) != 1:
        raise CntLensError(f"{out / 'checkpoints'}: expected heretic's one study journal, found {journals}")
    python = heretic.parent / "python"
    freeze = subprocess.run([str(python), "-m", "pip", "freeze"], capture_output=True, text=True, check=True)
    (out / "scratch-venv.txt").write_text(freeze.stdout, encoding="utf-8")  # the versions that made these trials
    done = subprocess.run([str(python), "-c", _READ_STUDY, str(journals[0])], capture_output=True, text=True,
                          check=True)
    return json.loads(done.stdout)


def _block_reading(row: dict, suffix: str, key: str) -> dict:
    """A block's ``refusal_harmful{suffix}`` rate as ``{key, key_n, key_ci95}``, per 100."""
    base = f"refusal_harmful{suffix}"
    return {key: 100 * row[base], f"{key}_n": row[f"{base}_n"], f"{key}_ci95": [100 * x for x in row[f"{base}_ci95"]]}


#: the applications whose target refuses and whose transfer removes it: what heretic's ablation does too
DELETIONS = tuple(name for name, app in APPLICATIONS.items() if app.refuser == "target")


def load_run(run: Path) -> tuple[Report, list[dict], dict]:
    """A finished deletion run's report, test answers (``items.jsonl``) and ``about``, checked before any work."""
    if not (run / "metrics.json").is_file() or not (run / "items.jsonl").is_file():
        raise CntLensError(f"--run {run}: no metrics.json and items.jsonl there (give a finished "
                           f"`cnt-lens run {'|'.join(DELETIONS)} --out RUN` directory)")
    report = Report.load(run / "metrics.json")
    about = report.extra.get("config", {}).get("about", {})
    if about.get("application") not in DELETIONS:
        raise CntLensError(f"{run / 'metrics.json'}: extra.config.about is {about}; give a run of an application "
                           f"that removes the target's refusal ({', '.join(DELETIONS)})")
    items = [json.loads(x) for x in (run / "items.jsonl").read_text(encoding="utf-8").splitlines()]
    return report, items, about


def _answers(row: dict, items: list[dict]) -> list[dict]:
    """The answers that hold ``row``'s model: the run's ``items``, or the file a benchmark's entry names."""
    path = Path(row["answers"]) if row.get("answers") else None
    if path is None or not path.is_file():
        return items
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


def run_rows(report: Report, items: list[dict], markers: list[str], prompts: list[str]) -> list[dict]:
    """Each model of the run's test tables: judge and marker refusals per 100 (n, 95% intervals), KL with its.

    Refusals are read from the run's answers (``items``) to ``prompts``; an edit a benchmark added, from the answers
    file its entry names (``answers``, e.g. ``benchmarks/direction_baseline.py``'s ``items.jsonl``) when it is
    there, else from its own block's reading, on its own n.
    """
    rows, wanted = [], set(prompts)
    colours = [MODEL_COLOURS["target"], MODEL_COLOURS["donor"], MODEL_COLOURS["patched"]]
    for index, row in enumerate(report.rows()):  # target, donor, patched, baselines: each in its report colour
        name = row["model"]
        # items.jsonl names a model as the run's result does: "patched", a baseline by its method
        names = {name, name.split(" (")[0], name.removeprefix("baseline ")}
        mine = [i for i in _answers(row, items) if i.get("model") in names and i.get("set") == "harmful"
                and i.get("prompt") in wanted]
        if mine:
            judge = rate("judge", [i["refused"] for i in mine], scale=100.0)
            marks = rate("markers", [marker_refusal(i["response"], markers) for i in mine], scale=100.0)
        elif "refusal_harmful_markers" in row:  # an edit a benchmark added keeps its own reading
            judge, marks = _block_reading(row, "", "judge"), _block_reading(row, "_markers", "markers")
        elif "refusal_harmful" in row:  # no answers kept (e.g. random neurons, generated until decided): judge only
            judge, marks = _block_reading(row, "", "judge"), {"markers": None, "markers_ci95": None}
            marks["markers_n"] = judge["judge_n"]
        else:
            continue
        if KL_NAME not in row:
            continue
        rows.append({"model": name, "neurons": row.get("n_neurons"), "n": marks["markers_n"],
                     "judge_per_100": judge["judge"], "judge_ci95": judge["judge_ci95"],
                     "markers_per_100": marks["markers"], "markers_ci95": marks["markers_ci95"],
                     "kl": row[KL_NAME], "kl_ci95": row.get(f"{KL_NAME}_ci95"),
                     "colour": colours[index] if index < 3 else BASELINE_COLOURS[(index - 3) % len(BASELINE_COLOURS)]})
    return rows


def figure(trials: list[dict], front: list[dict], rows: list[dict], n: int):
    """Refusals per 100 (heretic's markers) against first-token KL: heretic's trials and front, the run's models."""
    import plotly.graph_objects as go

    fig = go.Figure()
    fig.add_trace(go.Scatter(x=[t["kl"] for t in trials], y=[100 * t["refusals"] / n for t in trials],
                             mode="markers", name=f"heretic trials ({len(trials)})",
                             marker={"color": "#bbbbbb", "size": 7},
                             text=[f"trial {t['number']}" for t in trials]))
    fig.add_trace(go.Scatter(x=[t["kl"] for t in front], y=[100 * t["refusals"] / n for t in front],
                             mode="lines+markers", name="heretic's Pareto front (chosen on these prompts)",
                             line={"color": "#444444", "dash": "dot"}, marker={"color": "#444444", "size": 8}))
    for r in (r for r in rows if r["markers_per_100"] is not None):
        lo, hi = r["markers_ci95"]
        err_x = ({"type": "data", "symmetric": False, "array": [r["kl_ci95"][1] - r["kl"]],
                  "arrayminus": [r["kl"] - r["kl_ci95"][0]]} if r.get("kl_ci95") else None)
        name = r["model"] + (" (KL 0: off the log axis)" if r["kl"] <= 0 else "")
        fig.add_trace(go.Scatter(x=[r["kl"]], y=[r["markers_per_100"]], mode="markers", name=name,
                                 marker={"size": 12, "color": r["colour"], "symbol": "star" if r["model"].startswith("patched") else "circle"},
                                 error_y={"type": "data", "symmetric": False, "array": [hi - r["markers_per_100"]],
                                          "arrayminus": [r["markers_per_100"] - lo]}, error_x=err_x))
    fig.update_layout(title=f"refusals per 100 (heretic's markers, n={n} test prompts) against first-token KL "
                            "from the target", xaxis_title="first-token KL (nats), log scale",
                      yaxis_title="refusals per 100", xaxis_type="log", width=1000, height=560)
    return fig


def _earlier_wall(out: Path) -> float | None:
    """heretic's wall time as the run that made ``out``'s study recorded it (kept across ``--reuse``)."""
    path = out / "metrics.json"
    return json.loads(path.read_text(encoding="utf-8")).get("heretic_wall_s") if path.is_file() else None


def main() -> None:
    """Prepare, run heretic, read its trials, write and print the side-by-side numbers."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--heretic", type=Path, required=True, help="the `heretic` command of a scratch venv")
    ap.add_argument("--run", type=Path, required=True,
                    help=f"a finished `cnt-lens run {'|'.join(DELETIONS)}` directory")
    ap.add_argument("--trials", type=int, default=30)
    ap.add_argument("--startup-trials", type=int, default=10, help="random trials before TPE (heretic: 60 of 200)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=48, help="answer length (the run's, to compare the same)")
    ap.add_argument("--harmful-n", type=int, default=100, help="the first N harmful test prompts (heretic: 100)")
    ap.add_argument("--out", type=Path, default=None, help="default: runs/vs-heretic-NAME for --run …/NAME")
    ap.add_argument("--reuse", action="store_true", help="read the study already in OUT instead of running heretic")
    ap.add_argument("--into-run", action="store_true", help="add heretic's trials to RUN's metrics.json and report")
    args = ap.parse_args()
    if not args.heretic.is_file():
        sys.exit(f"--heretic {args.heretic}: no such file (install heretic-llm in a scratch venv; give its bin/heretic)")
    config_py = sorted(args.heretic.parent.parent.glob("lib/python*/site-packages/heretic/config.py"))
    if not config_py:
        sys.exit(f"--heretic {args.heretic}: no heretic/config.py in that venv's site-packages (is heretic-llm "
                 "installed there?)")
    markers = markers_in_source(config_py[0])
    report, items, about = load_run(args.run)  # fail on a wrong run before any work
    args.out = args.out or Path("runs") / f"vs-heretic-{args.run.resolve().name}"
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    prompts = prepare(args.out, args)
    n = len(prompts)
    rows = run_rows(report, items, markers, prompts)
    prepared_s = time.time() - t0
    heretic_s = _earlier_wall(args.out) if args.reuse else run_heretic(args.heretic, args.out)
    trials = read_trials(args.heretic, args.out)
    for t in trials:
        t.update(rate("per_100", [True] * t["refusals"] + [False] * (n - t["refusals"]), scale=100.0))
    front = sorted(pareto_front(trials, -1), key=lambda t: t["per_100"])  # fewer refusals is better here
    print(f"heretic: {len(trials)} trials, {heretic_s or 0:.0f} s (export and prompts {prepared_s:.0f} s); "
          f"{len(markers)} markers; n={n} harmful test prompts")
    print("| method | neurons | refusals per 100, heretic's markers | judge | first-token KL |")
    print("|---|---|---|---|---|")
    for t in front:
        lo, hi = t["per_100_ci95"]
        print(f"| heretic trial {t['number']} (front) | — | {t['per_100']:.1f} [{lo:.1f}, {hi:.1f}] | — | "
              f"{t['kl']:.4f} |")
    for r in rows:
        jlo, jhi = r["judge_ci95"]
        kl_ci = f" [{r['kl_ci95'][0]:.4f}, {r['kl_ci95'][1]:.4f}]" if r.get("kl_ci95") else ""
        marks = ("—" if r["markers_per_100"] is None else
                 f"{r['markers_per_100']:.1f} [{r['markers_ci95'][0]:.1f}, {r['markers_ci95'][1]:.1f}]")
        print(f"| {r['model']} (n={r['n']}) | {r['neurons'] or '—'} | {marks} | "
              f"{r['judge_per_100']:.1f} [{jlo:.1f}, {jhi:.1f}] | {r['kl']:.4f}{kl_ci} |")
    atomic_write_text(args.out / "metrics.json", json.dumps(
        {"run": str(args.run), "about": about, "n_harmful_test": n, "heretic_wall_s": heretic_s, "trials": trials,
         "front": [t["number"] for t in front], "run_rows": rows,
         "settings": {k: getattr(args, k) for k in ("trials", "startup_trials", "seed", "max_new_tokens",
                                                    "harmful_n")}},
        indent=1))
    figure(trials, front, rows, n).write_html(args.out / "vs_heretic.html", include_plotlyjs=True)
    print(f"wrote {args.out}/metrics.json, vs_heretic.html")
    if args.into_run:
        add_to_run(args.run, trials)


def add_to_run(run: Path, trials: list[dict]) -> None:
    """heretic's trials as the run's ``extra["peer_trials"]["heretic"]`` (replaced on a rerun); report rebuilt."""
    from cnt_lens.show.report import write_report

    report = Report.load(run / "metrics.json")
    points = [{"per_100": t["per_100"], "kl": t["kl"], "n": t["per_100_n"], "trial": t["number"]} for t in trials]
    report.extra.setdefault("peer_trials", {})["heretic"] = {"unit": "its markers", "points": points}
    report.save(run / "metrics.json")
    print(f"added heretic's trials to {run}/metrics.json; rebuilt {write_report(run)}", flush=True)


if __name__ == "__main__":
    try:
        main()
    except CntLensError as e:
        sys.exit(f"error: {e}")
