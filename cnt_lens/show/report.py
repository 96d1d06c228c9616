"""The standalone HTML report of a run directory: one file, plotly.js embedded, works offline."""

from __future__ import annotations

import hashlib
import html
import json
from pathlib import Path
from typing import Any

from cnt_lens.core.files import atomic_write_text
from cnt_lens.core.stats import format_rate
from cnt_lens.core.timing import Profile, stage
from cnt_lens.method.config import TransferConfig
from cnt_lens.method.divergence import KL_NAME
from cnt_lens.method.evaluate import Report
from cnt_lens.method.selection import NeuronScores
from cnt_lens.method.transplant import NeuronPatch
from cnt_lens.show.inspector import card_figure, neurons_stats
from cnt_lens.show.neuron_browser import browser_data, texts_from_items, write_neuron_browser
from cnt_lens.show.plots import behaviour_shift, frontier, layer_profile, refusal_kl, transfer_figure

__all__ = ["write_report"]


KEY_COLUMNS = ("n_neurons", "alpha", "refusal_harmful", "refusal_harmless", "kl_first_token", "stereotype_score",
               "task_rate", "utility_nll", "mc_accuracy")
"""The metrics table's first columns, where a run has them: the patch's size and strength, each behaviour's
headline, over-refusal, first-token KL from the target and utility; the rest follow in a second table."""


def _table_html(report: Report, cols: list[str]) -> str:
    """:meth:`Report.rows` in ``cols`` as an HTML table (rates with their interval and n)."""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in ["model", *cols])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(format_rate(r, c) if c != 'model' else r['model'])}</td>"
                                    for c in ["model", *cols]) + "</tr>" for r in report.rows())
    return f'<div class="scroll"><table class="metrics"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def _html_table(report: Report) -> str:
    """The metrics: the key columns (:data:`KEY_COLUMNS`) in view, every other number in a folded second table."""
    cols = report.columns()
    key = [c for c in ("n_neurons", "alpha", report.headline(), *KEY_COLUMNS) if c in cols]
    key = list(dict.fromkeys(key))
    rest = [c for c in cols if c not in key]
    more = (f"<details><summary>all {len(rest)} other numbers</summary>{_table_html(report, rest)}</details>"
            if rest else "")
    return _table_html(report, key or cols) + more


def _shares_html(report: Report) -> str:
    """The headline rate per prompt role and family with each model's share of the gap (:meth:`Report.shares_cells`)."""
    cols, cells, ratios = report.shares_cells()
    if not cells:
        return ""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in cells)
    return (f'<h2 id="distribution">In and out of distribution</h2><p>Harmful-request refusal by the role each '
            f'prompt family played (selection: the neurons were chosen on its train split, and k and alpha on its '
            f'validation split unless a search family chose them; search: k and alpha on its validation split; '
            f'held_out: no choice saw it) and by family; share: the patched model\'s share of the donor–target '
            f'gap.</p><div class="scroll"><table class="metrics"><thead><tr>{head}</tr></thead><tbody>{body}</tbody>'
            f'</table></div>' + (f'<p>Share of the gap out of distribution ÷ in distribution: '
                                 f'{html.escape("; ".join(ratios))}.</p>' if ratios else ""))


_VERDICTS = ("refused", "marked", "followed")
"""Item fields that say what a response did, shown beside it (the first one an item has)."""
_MODELS = ("target", "patched", "donor")


def _timings_html(path: Path, timings: Profile | None = None) -> str:
    """The run's per-stage wall time (``timings``, or ``timings.json``: :mod:`cnt_lens.core.timing`) as a table."""
    if timings is None and not path.is_file():
        return ""
    t = timings.to_dict() if timings is not None else json.loads(path.read_text(encoding="utf-8"))
    body = "".join(f'<tr><td style="padding-left:{0.8 + 1.5 * r["depth"]}em">'
                   f'{html.escape(r["stage"].rsplit(" / ", 1)[-1])}</td><td>{r["seconds"]:.1f}</td>'
                   f'<td>{r["calls"]}</td><td>{r["share"]:.1%}</td></tr>' for r in t["stages"])
    return (f'<h2 id="timings">Where the time went</h2><p>{t["total_s"]:.0f} s wall in all (up to the report).</p>'
            f'<table class="metrics"><thead><tr><th>stage</th><th>seconds</th><th>calls</th><th>share</th></tr>'
            f'</thead><tbody>{body}</tbody></table>')


def _examples_html(items_path: Path, per_set: int = 4, max_chars: int = 360) -> str:
    """Target / patched / donor responses side by side for the same test prompts (from ``items.jsonl``).

    Up to ``per_set`` prompts of each prompt set (harmful, harmless, …) — half as many of each family
    where a set mixes families, so held-out framings show beside the family the choice was made on —
    the same ones for every model, picked by a hash of their id: a fixed sample, not the patch's best cases.
    """
    if not items_path.is_file():
        return ""
    rows: dict[tuple[str, str, str], dict[str, dict[str, Any]]] = {}
    for line in items_path.read_text(encoding="utf-8").splitlines():
        item = json.loads(line)
        if item.get("model") in _MODELS and "response" in item and "prompt" in item:
            key = (item.get("set", ""), item.get("family") or "", item["id"])
            rows.setdefault(key, {})[item["model"]] = item
    complete = {k: v for k, v in rows.items() if set(v) == set(_MODELS)}
    picked: list[tuple[str, str, str]] = []
    for name in sorted({s for s, _, _ in complete}):
        families = sorted({f for s, f, _ in complete if s == name})
        for fam in families:
            ids = sorted((k for k in complete if k[:2] == (name, fam)), key=lambda k: hashlib.sha1(k[2].encode()).hexdigest())
            picked += ids[: per_set if len(families) == 1 else max(1, per_set // 2)]
    if not picked:
        return ""

    def flip(row: dict[str, dict[str, Any]]) -> bool:
        """The patched answer's verdict differs from the target's."""
        key = next((k for k in _VERDICTS if k in row["patched"]), None)
        return key is not None and row["patched"][key] != row["target"].get(key)

    def cell(row: dict[str, dict[str, Any]], model: str) -> str:
        item = row[model]
        text = item["response"].strip()
        text = text if len(text) <= max_chars else text[:max_chars] + "…"
        key = next((k for k in _VERDICTS if k in item), None)
        flipped = model == "patched" and flip(row)
        tag = (f'<div class="verdict">{key}: {"yes" if item[key] else "no"}{" — flipped" if flipped else ""}</div>'
               if key else "")
        return f'<td>{"<div class=flipped>" if flipped else "<div>"}{tag}{html.escape(text)}</div></td>'

    head = "".join(f"<th>{m}</th>" for m in ("prompt", *_MODELS))
    body = "".join(f"<tr><td><b>{html.escape(' · '.join(x for x in k[:2] if x))}</b><br>"
                   f"{html.escape(complete[k]['target']['prompt'])}</td>"
                   + "".join(cell(complete[k], m) for m in _MODELS) + "</tr>" for k in picked)
    flips = sum(flip(complete[k]) for k in picked)
    return (f'<h2 id="examples">Example responses</h2><p>{flips} of {len(picked)} shown answers changed verdict from '
            f'the target\'s (highlighted).</p><table class="examples"><thead><tr>{head}</tr></thead><tbody>{body}'
            f'</tbody></table>')


def _neuron_browser(run: Path, pair: Any, behaviour: Any, scores: NeuronScores | None) -> str:
    """Write ``neurons.html`` (measured with models, else rebuilt from ``neurons.json``); the report's link to it."""
    patch_path, data_path = run / "patch.safetensors", run / "neurons.json"
    if pair is not None and behaviour is not None and patch_path.is_file():
        items = run / "items.jsonl"
        rows = [json.loads(line) for line in items.read_text(encoding="utf-8").splitlines()] if items.is_file() else []
        with stage("neuron browser"):
            data = browser_data(pair, behaviour, NeuronPatch.load(patch_path, pair.target), scores,
                                texts=texts_from_items(rows, pair.tokenizer))
    elif data_path.is_file():
        data = json.loads(data_path.read_text(encoding="utf-8"))
    else:
        return ""
    write_neuron_browser(run, data)
    return (f'<p class="browse"><a href="neurons.html">Browse all {len(data["neurons"])} transplanted neurons</a> '
            f'(a sortable table; each row opens the neuron\'s card: top texts with per-token activations, '
            f'histograms, the logit lens of the change).</p>')


def _frontier_in_kl(report: Report, chosen: dict[str, Any] | None) -> list[Any]:
    """The search points' headline against their first-token KL (validation), when the points read one."""
    head = report.headline()
    points = [p for p in report.frontier if KL_NAME in p and head in p]
    if not points or head is None:
        return []
    return [frontier(points, x=KL_NAME, y=head, chosen=chosen,
                     title=f"search points: {head} against first-token KL from the target (validation)")]


def write_report(run_dir: str | Path, *, pair: Any = None, scores: dict[str, NeuronScores] | None = None,
                 behaviour: Any = None, n_cards: int = 4, timings: Profile | None = None) -> Path:
    """Write ``run_dir/report.html`` from ``metrics.json``, ``patch.safetensors``, ``scores/`` and ``cards.json``.

    A ``budget_curves.json`` beside them (``benchmarks/budget_curves.py``: test rates of each ranking over
    budgets, with reference levels) is drawn too, by :func:`~cnt_lens.show.plots.frontier`.
    With ``pair`` and ``behaviour``, the cards of the ``n_cards`` top selected neurons are computed
    and saved to ``cards.json`` first, so a later rebuild (``cnt-lens report``) needs no models.
    ``timings``: the run's profile so far (a run still open has not written ``timings.json``).
    """
    run = Path(run_dir)
    report = Report.load(run / "metrics.json")
    method = report.patched.get("method", "weight_attribution")
    if scores is None:
        path = run / "scores" / f"{method}.safetensors"
        scores = {method: NeuronScores.load(path)} if path.is_file() else {}
    figures = []
    sel = NeuronPatch.load(run / "patch.safetensors").selection if (run / "patch.safetensors").is_file() else None
    if method in scores and sel is not None:
        figures.append(transfer_figure(scores[method], sel, report))
        figures.append(layer_profile(sel, scores[method]))
    figures.append(behaviour_shift(report))
    units = refusal_kl(report)  # the field's units: refusals per 100 against first-token KL
    if units is not None:
        figures.append(units)
    if report.frontier:
        goal = TransferConfig.from_dict(report.extra.get("config", {})).search.goal
        chosen = next((p for p in report.frontier if p.get("k") == report.patched.get("n_neurons")
                       and p.get("alpha") == report.patched.get("alpha") and p.get("measured") != "estimate"), None)
        figures.append(frontier(report.frontier, references={"donor": 1.0, **({"goal": goal} if goal else {})},
                                chosen=chosen))
        figures += _frontier_in_kl(report, chosen)
    curves_path = run / "budget_curves.json"
    if curves_path.is_file():  # written by benchmarks/budget_curves.py: each ranking's test rates over budgets
        figures.append(frontier(**json.loads(curves_path.read_text())))
    cards_path = run / "cards.json"
    if pair is not None and behaviour is not None and sel is not None and method in scores:
        ranked = scores[method].ranked().masked_fill(~sel.mask, float("-inf"))
        top = ranked.flatten().topk(min(n_cards, sel.n)).indices.tolist()
        with stage("neuron cards"):
            cards = neurons_stats(pair, [(i // sel.shape[1], i % sel.shape[1]) for i in top], behaviour, split="test")
        atomic_write_text(cards_path, json.dumps(cards))
    else:
        cards = json.loads(cards_path.read_text()) if cards_path.is_file() else []
    browser = _neuron_browser(run, pair, behaviour, scores.get(method))
    anchors = [f"figure-{i + 1}" for i in range(len(figures))] + [f"card-{i + 1}" for i in range(len(cards))]
    figures += [card_figure(s) for s in cards]
    with stage("figures"):
        parts = [f.to_html(full_html=False, include_plotlyjs=("inline" if i == 0 else False))
                 for i, f in enumerate(figures)]
    table = _html_table(report)
    body = "\n".join(f'<section id="{a}">{p}</section>' for a, p in zip(anchors, parts))
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>cnt_lens report: {html.escape(report.behaviour)}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto}}table{{border-collapse:collapse}}td,th{{padding:.3em .8em;border-bottom:1px solid #ddd;text-align:right}}td:first-child,th:first-child{{text-align:left}}.scroll{{overflow-x:auto}}.metrics{{font-size:.85em}}.metrics td{{white-space:nowrap}}.examples th,.examples td{{text-align:left;vertical-align:top}}.examples td{{white-space:pre-wrap;font-size:.85em;max-width:22em}}.verdict{{font-weight:600;color:#555}}.flipped{{background:#fff3bf}}.browse{{font-size:1.1em}}</style>
</head><body><h1>cnt_lens — {html.escape(report.behaviour)} transfer</h1>
<p>{report.n_neurons_total} MLP neurons; numbers on the <b>{report.split}</b> split.</p>
{browser}
<h2>Metrics</h2>{table}
<p>Rates: share [95% Wilson interval] n = prompts counted.</p>
{_shares_html(report)}
{_examples_html(run / "items.jsonl")}
{body}
{_timings_html(run / "timings.json", timings)}
</body></html>"""
    out = run / "report.html"
    return atomic_write_text(out, page)
