"""Plotly figures of scores, selections, behaviour shifts, search frontiers and edits in the field's units.

Each returns a ``go.Figure``.
"""

from __future__ import annotations

from typing import Any, Sequence

import plotly.graph_objects as go
import torch
from einops import reduce
from plotly.subplots import make_subplots

from cnt_lens.method.evaluate import KL_NAME, Report
from cnt_lens.method.selection import NeuronScores, NeuronSelection

__all__ = ["MODEL_COLOURS", "behaviour_shift", "frontier", "layer_profile", "refusal_kl", "selection_heatmap",
           "transfer_figure"]

MODEL_COLOURS = {"target": "#1f77b4", "patched": "#d62728", "donor": "#2ca02c"}
"""One colour per model in every figure: blue the target, red the patched target, green the donor."""
BASELINE_COLOURS = ("#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf", "#ff7f0e")
"""Baselines, in order: none of them is a model's colour."""


def _layer_ticks(fig: go.Figure, n_layers: int, axis: str = "y", **where: Any) -> None:
    """Whole-number layer ticks (every layer up to 32 layers, then plotly's choice of whole numbers)."""
    ticks = {"tickmode": "linear", "tick0": 0, "dtick": 1} if n_layers <= 32 else {"tickformat": "d"}
    (fig.update_yaxes if axis == "y" else fig.update_xaxes)(**ticks, **where)


def _bin_size(d_mlp: int, max_bins: int) -> int:
    size = 1
    while d_mlp // size > max_bins or d_mlp % size:
        size += 1
    return size


def _heatmap_trace(scores: NeuronScores, selection: NeuronSelection | None, max_bins: int,
                   color: str = "score") -> go.Heatmap:
    """Heatmap of binned layers × neurons.

    ``color="score"`` shows each bin's max score, ``"selected"`` how many of its neurons are
    selected (readable whatever the scores' scale, e.g. rank-valued iterative scores).
    """
    if color not in ("score", "selected"):
        raise ValueError(f"color is 'score' or 'selected', got {color!r}")
    v = scores.ranked().clamp(min=torch.finfo(torch.float32).min)
    n_layers, d_mlp = v.shape
    size = _bin_size(d_mlp, max_bins)
    best = reduce(v, "l (b s) -> l b", "max", s=size)
    sel = selection.mask if selection is not None else torch.zeros(n_layers, d_mlp, dtype=torch.bool)
    counts = reduce(sel.float(), "l (b s) -> l b", "sum", s=size)
    custom = [[[f"{b * size}–{(b + 1) * size - 1}", int(counts[layer, b]), float(best[layer, b])] for b in range(best.shape[1])]
              for layer in range(n_layers)]
    hover = "layer %{y}<br>neurons %{customdata[0]}<br>max score %{customdata[2]:.3g}<br>selected %{customdata[1]}"
    style = ({"colorscale": "RdBu_r", "zmid": 0} if color == "score" else {"colorscale": "Blues", "zmin": 0})
    return go.Heatmap(
        z=(best if color == "score" else counts).tolist(), x=[b * size for b in range(best.shape[1])],
        y=list(range(n_layers)), customdata=custom, **style,
        colorbar={"title": "max score" if color == "score" else f"selected<br>per {size}", "thickness": 12},
        hovertemplate=hover + "<extra></extra>",
    )


def selection_heatmap(scores: NeuronScores, selection: NeuronSelection | None = None, *, max_bins: int = 128,
                      color: str = "score") -> go.Figure:
    """Layers × neurons (binned to ≤ ``max_bins`` columns), with selected neurons marked.

    A bin's colour is its max score (``color="score"``) or its number of selected neurons
    (``color="selected"``); the hover shows both.
    """
    fig = go.Figure(_heatmap_trace(scores, selection, max_bins, color))
    if selection is not None and selection.n:
        idx = torch.tensor(selection.indices())
        fig.add_trace(go.Scattergl(x=idx[:, 1].tolist(), y=idx[:, 0].tolist(), mode="markers", name="selected",
                                   marker={"symbol": "line-ns-open", "size": 6, "color": "black"},
                                   hovertemplate="layer %{y}, neuron %{x}<extra>selected</extra>"))
    fig.update_layout(title=f"{scores.method} scores for {scores.behaviour}", xaxis_title="neuron", yaxis_title="layer")
    _layer_ticks(fig, scores.shape[0])
    return fig


def layer_profile(selection: NeuronSelection, scores: NeuronScores | None = None) -> go.Figure:
    """Selected neurons per layer (bars) and, with scores, the positive score mass per layer (line).

    Rank-valued scores (:func:`~cnt_lens.method.rounds.iterative_scores`, whose ``meta`` has ``rounds``)
    get no line: a sum of ranks measures nothing.
    """
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    layers = list(range(selection.shape[0]))
    fig.add_trace(go.Bar(x=layers, y=selection.per_layer(), name="selected neurons"), secondary_y=False)
    if scores is not None and "rounds" not in scores.meta:
        mass = torch.nan_to_num(scores.values, nan=0.0).clamp(min=0).sum(1)
        fig.add_trace(go.Scatter(x=layers, y=mass.tolist(), name="positive score mass"), secondary_y=True)
    fig.update_layout(title="selection per layer", xaxis_title="layer")
    _layer_ticks(fig, selection.shape[0], axis="x")
    return fig


def _interval_bars(block: dict[str, Any], metrics: Sequence[str], scale: float = 1.0) -> dict[str, Any]:
    """Plotly error bars from the numbers' ``_ci95``, times ``scale`` (zero-length for numbers without one)."""
    up, down = [], []
    for m in metrics:
        v, ci = block.get(m), block.get(f"{m}_ci95")
        ok = isinstance(v, float) and isinstance(ci, (list, tuple))
        up.append(scale * (ci[1] - v) if ok else 0.0)
        down.append(scale * (v - ci[0]) if ok else 0.0)
    return {"type": "data", "symmetric": False, "array": up, "arrayminus": down}


def _panels(report: Report, metrics: Sequence[str]) -> list[tuple[str, list[str]]]:
    """``metrics`` grouped by scale, so a 0–1 rate is never a sliver beside an NLL in nats.

    Groups: rates (0–1, with intervals), percentages (with intervals) and other numbers; empty
    groups are dropped.
    """
    def kind(m: str) -> str:
        v, ci = report.target.get(m), report.target.get(f"{m}_ci95")
        if isinstance(ci, (list, tuple)):
            return "rates (0–1)" if isinstance(v, float) and abs(v) <= 1 and ci[1] <= 1 else "percentages"
        return "other numbers"

    order = ("rates (0–1)", "percentages", "other numbers")
    return [(k, [m for m in metrics if kind(m) == k]) for k in order if any(kind(m) == k for m in metrics)]


def behaviour_shift(report: Report, metrics: Sequence[str] | None = None) -> go.Figure:
    """Target / patched / donor (and baselines) side by side for each behaviour number.

    One panel per scale (rates, percentages, other numbers), rates with their 95% intervals.

    A baseline none of whose alphas met the validation constraint is labelled "(no acceptable α)".
    """
    metrics = list(metrics or report.numbers())
    panels = _panels(report, metrics)
    fig = make_subplots(rows=1, cols=len(panels), subplot_titles=[t for t, _ in panels],
                        column_widths=[max(len(ms), 1) for _, ms in panels])
    blocks = [("target", report.target, MODEL_COLOURS["target"]),
              (f"patched ({report.patched.get('method')})", report.patched, MODEL_COLOURS["patched"]),
              ("donor", report.donor, MODEL_COLOURS["donor"])] + [
        (b["method"] + ("" if b.get("acceptable_on_validation", True) else " (no acceptable α)"), b,
         BASELINE_COLOURS[i % len(BASELINE_COLOURS)]) for i, b in enumerate(report.baselines)]
    for col, (_, ms) in enumerate(panels, 1):
        for name, block, colour in blocks:
            fig.add_trace(go.Bar(name=name, x=ms, y=[block.get(m) for m in ms], error_y=_interval_bars(block, ms),
                                 marker_color=colour, legendgroup=name, showlegend=col == 1), row=1, col=col)
    fig.update_xaxes(automargin=True, tickangle=-30)
    fig.update_layout(barmode="group", title=f"{report.behaviour} on the {report.split} split (bars: 95% intervals)",
                      margin={"b": 120})
    return fig


#: a method measured at more alphas than this is drawn as points coloured by alpha, not one line per alpha
_ALPHA_LINES = 8


def frontier(points: Sequence[dict[str, Any]], *, y: str = "gap_closed", x: str = "k",
             references: dict[str, float] | None = None, title: str = "search frontier (validation)",
             chosen: dict[str, Any] | None = None) -> go.Figure:
    """Measured points: neurons vs ``y``, one line per (method, alpha); estimates dotted.

    ``references`` draws a dashed horizontal line per named level (e.g. ``{"donor": 0.96}``: the level a
    transplant has to reach) on the same ``y`` scale. ``chosen`` (a point's ``x``, ``y`` and ``alpha``)
    is marked with a star. A method measured at more than ``_ALPHA_LINES`` alphas (a Pareto search's
    continuous alpha) is drawn as points coloured by alpha instead, one series per way of measuring.
    """
    fig = go.Figure()
    keys = sorted({(p["method"], p["alpha"], p.get("measured", "evaluation")) for p in points}, key=str)
    alphas = {m: {a for mm, a, _ in keys if mm == m} for m, _, _ in keys}
    for method, measured in sorted({(m, w) for m, _, w in keys if len(alphas[m]) > _ALPHA_LINES}):
        pts = [p for p in points if p["method"] == method and p.get("measured", "evaluation") == measured]
        name = f"{method}, α searched" + (" (estimate)" if measured == "estimate" else "")
        fig.add_trace(go.Scatter(x=[p[x] for p in pts], y=[p[y] for p in pts], mode="markers", name=name,
                                 marker={"color": [p["alpha"] for p in pts], "colorscale": "Viridis", "size": 9,
                                         "symbol": "circle-open" if measured == "estimate" else "circle",
                                         "colorbar": {"title": "α", "x": 1.15}},
                                 text=[f"α={p['alpha']:g}" for p in pts],
                                 hovertemplate=f"{x} %{{x}}<br>{y} %{{y:.3f}}<br>%{{text}}<extra>{name}</extra>"))
    keys = [key for key in keys if len(alphas[key[0]]) <= _ALPHA_LINES]
    for method, alpha, measured in keys:
        pts = sorted((p for p in points if (p["method"], p["alpha"], p.get("measured", "evaluation"))
                      == (method, alpha, measured)), key=lambda p: p[x])
        name = f"{method} α={alpha:g}" + (" (estimate)" if measured == "estimate" else "")
        fig.add_trace(go.Scatter(x=[p[x] for p in pts], y=[p[y] for p in pts], mode="lines+markers", name=name,
                                 line={"dash": "dot" if measured == "estimate" else "solid"},
                                 customdata=[[p.get("refusal_harmless"), p.get("utility_nll")] for p in pts],
                                 hovertemplate=f"{x} %{{x}}<br>{y} %{{y:.3f}}<extra>{name}</extra>"))
    by_level = sorted((references or {}).values())
    for label, level in (references or {}).items():  # neighbouring levels' labels on opposite sides
        fig.add_hline(y=level, line_dash="dash", line_color="grey", annotation_text=f"{label} {level:.2f}",
                      annotation_position="bottom right" if by_level.index(level) % 2 else "top left")
    if chosen is not None and chosen.get(x) is not None and chosen.get(y) is not None:
        fig.add_trace(go.Scatter(x=[chosen[x]], y=[chosen[y]], mode="markers", name="chosen",
                                 marker={"symbol": "star", "size": 18, "color": MODEL_COLOURS["patched"],
                                         "line": {"width": 1, "color": "black"}},
                                 hovertemplate=f"chosen: {x} %{{x}}, α={chosen.get('alpha', '?')}<extra></extra>"))
    fig.update_layout(title=title, xaxis_title=x, yaxis_title=y, xaxis_type="log", showlegend=True)  # one line too
    return fig


def transfer_figure(scores: NeuronScores, selection: NeuronSelection, report: Report,
                    metrics: Sequence[str] | None = None, *, max_bins: int = 96) -> go.Figure:
    """The selected neurons per layer (heatmap: selected count per bin) beside the behaviour they change (bars)."""
    fig = make_subplots(rows=1, cols=2, column_widths=[0.62, 0.38], horizontal_spacing=0.1,
                        subplot_titles=(f"selected neurons ({selection.n}) over {scores.method} scores",
                                        f"{report.behaviour}: target → patched → donor"))
    heat = _heatmap_trace(scores, selection, max_bins, color="selected")
    heat.colorbar.update(x=0.57, len=0.9)  # beside the heatmap, clear of the bars' legend
    fig.add_trace(heat, row=1, col=1)
    metrics = list(metrics or dict(_panels(report, report.numbers())).get("rates (0–1)", []))  # one scale
    for name, block in (("target", report.target), ("patched", report.patched), ("donor", report.donor)):
        fig.add_trace(go.Bar(name=name, x=metrics, y=[block.get(m) for m in metrics], marker_color=MODEL_COLOURS[name],
                             error_y=_interval_bars(block, metrics)), row=1, col=2)
    fig.update_xaxes(title_text="neuron", row=1, col=1)
    fig.update_yaxes(title_text="layer", row=1, col=1)
    fig.update_yaxes(title_text="rate (0–1)", range=[0, 1.05], row=1, col=2)
    fig.update_xaxes(automargin=True, tickangle=-30, row=1, col=2)
    _layer_ticks(fig, selection.shape[0], row=1, col=1)
    fig.update_layout(barmode="group", height=560, legend={"orientation": "h", "x": 0.64, "y": -0.3},
                      margin={"b": 140})
    return fig


def refusal_kl(report: Report) -> go.Figure | None:
    """Refusals per 100 harmful prompts against first-token KL from the target: one marker per model of ``report``.

    The field's two units (:meth:`~cnt_lens.method.evaluate.Report.units_table`), both with their 95% intervals:
    an edit is better the closer it lands to the donor's refusal at the smaller KL. A peer tool's trials that a
    benchmark stored in ``report.extra["peer_trials"][tool]`` (``{"unit": …, "points": [{"per_100", "kl"}, …]}``,
    e.g. ``benchmarks/vs_heretic.py``) are drawn as one grey series named with their unit. ``None`` when the run has
    no refusal headline or no KL.
    """
    head = report.headline()
    if not head or not head.startswith("refusal") or KL_NAME not in report.target:
        return None
    fig = go.Figure()
    # rows() is target, donor, patched, then the baselines: each in its colour of every other figure
    colours = [MODEL_COLOURS["target"], MODEL_COLOURS["donor"], MODEL_COLOURS["patched"],
               *(BASELINE_COLOURS[i % len(BASELINE_COLOURS)] for i in range(len(report.baselines)))]
    for row, colour in zip(report.rows(), colours):
        name, v, kl = row["model"], row.get(head), row.get(KL_NAME)
        if not (isinstance(v, float) and isinstance(kl, float)):
            continue
        fig.add_trace(go.Scatter(x=[kl], y=[100 * v], mode="markers", name=name,
                                 marker={"size": 12, "color": colour, "symbol": "star" if name.startswith("patched")
                                         else "circle"},
                                 error_x=_interval_bars(row, [KL_NAME]), error_y=_interval_bars(row, [head], 100.0),
                                 hovertemplate=f"{name}<br>{head} %{{y:.1f}} per 100 (n={row.get(f'{head}_n')})"
                                               f"<br>KL %{{x:.4f}} nats<extra></extra>"))
    for tool, peer in report.extra.get("peer_trials", {}).items():
        _add_peer_trials(fig, tool, peer)
    fig.update_layout(title=f"{head} per 100 against first-token KL from the target ({report.split}; bars: 95% "
                            "intervals)", xaxis_title=f"{KL_NAME} (nats)", yaxis_title=f"{head} per 100")
    return fig


def _add_peer_trials(fig: go.Figure, tool: str, peer: dict[str, Any]) -> None:
    """One grey series of a peer tool's trials: refusals per 100 (by ``peer["unit"]``) against first-token KL."""
    points = peer["points"]
    fig.add_trace(go.Scatter(x=[p["kl"] for p in points], y=[p["per_100"] for p in points], mode="markers",
                             name=f"{tool} trials ({len(points)}; refusals by {peer['unit']})",
                             marker={"size": 7, "color": "#b0b0b0", "symbol": "diamond"},
                             hovertemplate=f"{tool}<br>%{{y:.1f}} per 100<br>KL %{{x:.4f}} nats<extra></extra>"))
