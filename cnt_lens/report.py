"""The standalone HTML report of a run directory: one file, plotly.js embedded, works offline."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from .evaluate import Report
from .files import atomic_write_text
from .inspector import card_figure, neuron_stats
from .plots import behaviour_shift, frontier, layer_profile, transfer_figure
from .selection import NeuronScores
from .stats import format_rate
from .transplant import NeuronPatch

__all__ = ["write_report"]


def _html_table(report: Report) -> str:
    """The metrics of :meth:`Report.rows` as an HTML table (rates with their interval and n)."""
    cols = report.columns()
    head = "".join(f"<th>{html.escape(c)}</th>" for c in ["model", *cols])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(format_rate(r, c) if c != 'model' else r['model'])}</td>"
                                    for c in ["model", *cols]) + "</tr>" for r in report.rows())
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def write_report(run_dir: str | Path, *, pair: Any = None, scores: dict[str, NeuronScores] | None = None,
                 behaviour: Any = None, n_cards: int = 4) -> Path:
    """Write ``run_dir/report.html`` from ``metrics.json``, ``patch.safetensors``, ``scores/`` and ``cards.json``.

    With ``pair`` and ``behaviour``, the cards of the ``n_cards`` top selected neurons are computed
    and saved to ``cards.json`` first, so a later rebuild (``cnt-lens report``) needs no models.
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
    if report.frontier:
        figures.append(frontier(report.frontier))
    cards_path = run / "cards.json"
    if pair is not None and behaviour is not None and sel is not None and method in scores:
        ranked = scores[method].ranked().masked_fill(~sel.mask, float("-inf"))
        top = ranked.flatten().topk(min(n_cards, sel.n)).indices.tolist()
        cards = [neuron_stats(pair, i // sel.shape[1], i % sel.shape[1], behaviour, split="test") for i in top]
        atomic_write_text(cards_path, json.dumps(cards))
    else:
        cards = json.loads(cards_path.read_text()) if cards_path.is_file() else []
    figures += [card_figure(s) for s in cards]
    parts = [f.to_html(full_html=False, include_plotlyjs=("inline" if i == 0 else False)) for i, f in enumerate(figures)]
    table = _html_table(report)
    body = "\n".join(f"<section>{p}</section>" for p in parts)
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>cnt_lens report: {html.escape(report.behaviour)}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto}}table{{border-collapse:collapse}}td,th{{padding:.3em .8em;border-bottom:1px solid #ddd;text-align:right}}td:first-child,th:first-child{{text-align:left}}</style>
</head><body><h1>cnt_lens — {html.escape(report.behaviour)} transfer</h1>
<p>{report.n_neurons_total} MLP neurons; numbers on the <b>{report.split}</b> split.</p>
<h2>Metrics</h2>{table}
<p>Rates: share [95% Wilson interval] n = prompts counted.</p>
{body}
</body></html>"""
    out = run / "report.html"
    return atomic_write_text(out, page)
