"""Interactive neuron inspection: what one neuron does in donor and target, and how it differs.

:func:`neuron_stats` gathers the data (plain tensors and lists, easy to test and to reuse; :func:`neurons_stats`
for several neurons in one pass);
:func:`neuron_card` draws it; :func:`inspect` puts a clickable score heatmap in a notebook that
opens the card of the clicked neuron (a static heatmap plus the top neuron's card elsewhere).
"""

from __future__ import annotations

from typing import Any

import plotly.graph_objects as go
import torch
from jaxtyping import Float
from plotly.subplots import make_subplots

from cnt_lens.behaviours.base import Behaviour
from cnt_lens.method.selection import NeuronScores, NeuronSelection
from cnt_lens.models.forward import Model, model_tokenizer
from cnt_lens.models.neurons import neuron_params
from cnt_lens.models.pair import ModelPair
from cnt_lens.show.activations import sequence_activations
from cnt_lens.show.plots import selection_heatmap

__all__ = ["card_figure", "inspect", "logit_lens", "logit_lens_rows", "neuron_card", "neuron_stats", "neurons_stats", "sequence_activations"]


def _in_context(tok: Any, ids: list[int], peak: int, before: int = 24, after: int = 6) -> str:
    """The tokens of ``ids`` around position ``peak``, the peak token in ⟦ ⟧."""
    lo = max(0, peak - before)
    text = (("…" if lo else "") + tok.decode(ids[lo:peak], skip_special_tokens=True) + "⟦" + tok.decode([ids[peak]])
            + "⟧" + tok.decode(ids[peak + 1:peak + 1 + after], skip_special_tokens=True))
    return " ".join(text.split())


def _template_span(seqs: list[list[int]]) -> tuple[int, int]:
    """Lengths of the token prefix and suffix that every sequence shares (the chat template around the user's words).

    >>> _template_span([[1, 2, 7, 8, 9], [1, 2, 5, 9]])
    (2, 1)
    """
    if len(seqs) < 2:
        return 0, 0
    shortest = min(len(x) for x in seqs)
    pre = next((i for i in range(shortest) if len({x[i] for x in seqs}) > 1), shortest)
    suf = next((i for i in range(shortest - pre) if len({x[-1 - i] for x in seqs}) > 1), shortest - pre)
    return pre, suf


Activations = tuple[list[list[int]], list[list[torch.Tensor]], list[list[float]]]
"""Token ids per prompt; per neuron, activations per prompt and the activation at each prompt's last token."""


def _activations(model: Model, batches: list, neurons: list[tuple[int, int]]) -> Activations:
    """Per neuron, :func:`sequence_activations` split by prompt, and each prompt's activation at its last token."""
    seqs, acts = sequence_activations(model, batches, neurons)
    return (seqs, [[a[:, j] for a in acts] for j in range(len(neurons))],
            [[float(a[-1, j]) for a in acts] for j in range(len(neurons))])


def _on_user_words(seqs: list[list[int]], acts: list[torch.Tensor], span: tuple[int, int],
                   tok: Any) -> tuple[list[float], list[dict[str, Any]], float]:
    """Activations on the user's words, each prompt's peak there, and the template's largest activation.

    ``span`` holds the template's prefix and suffix lengths, which are left out (largest activation
    on them: NaN without a template). Leaving the chat template out keeps a template token that fires on every prompt (often the
    first one) from hiding what the neuron reads.
    """
    pre, suf = span
    values: list[float] = []
    template: list[float] = []
    per_prompt: list[dict[str, Any]] = []
    for ids, act in zip(seqs, acts):
        lo, hi = (pre, len(ids) - suf) if len(ids) - suf > pre else (0, len(ids))
        values += act[lo:hi].tolist()
        template += act[:lo].tolist() + act[hi:].tolist()
        peak = lo + int(act[lo:hi].argmax())
        per_prompt.append({"text": _in_context(tok, ids[lo:hi], peak - lo), "token": tok.decode([ids[peak]]),
                           "max_activation": float(act[peak])})
    return values, per_prompt, max(template, default=float("nan"))


def logit_lens(model: Model, row: Float[torch.Tensor, " d_model"], k: int) -> dict[str, list[tuple[str, float]]]:
    """Tokens a residual-stream write ``row`` promotes / suppresses, read through final norm scale and unembedding."""
    return logit_lens_rows(model, row[None], k)[0]


def logit_lens_rows(model: Model, rows: Float[torch.Tensor, "n d_model"], k: int, *,
                    chunk: int = 256) -> list[dict[str, list[tuple[str, float]]]]:
    """:func:`logit_lens` of each of ``rows``, unembedded ``chunk`` rows per matrix product.

    One product for many rows instead of one per row: the unembedding (``[vocab, d_model]``) is read
    once per chunk; ``chunk`` bounds the ``[chunk, vocab]`` logits held at once.
    """
    tok = model_tokenizer(model)
    hf = model.original_model
    norm = getattr(getattr(hf, "model", None), "norm", None) or getattr(getattr(hf, "transformer", None), "ln_f", None)
    weight = getattr(norm, "weight", None)
    unembed = hf.get_output_embeddings().weight.detach().float()  # [vocab, d_model]
    rows = rows.detach().float().to(unembed.device)
    if weight is not None:
        rows = rows * weight.detach().float().to(unembed.device)
    out = []
    for part in rows.split(chunk):
        logits = part @ unembed.T  # [chunk, vocab]
        top, bottom = logits.topk(k, dim=-1), (-logits).topk(k, dim=-1)
        out += [{"promoted": [(tok.decode([i]), v) for v, i in zip(tv, ti)],
                 "suppressed": [(tok.decode([i]), -v) for v, i in zip(bv, bi)]}
                for tv, ti, bv, bi in zip(top.values.tolist(), top.indices.tolist(),
                                          bottom.values.tolist(), bottom.indices.tolist())]
    return out


def _logit_lens(model: Model, layer: int, neuron: int, k: int) -> dict[str, list[tuple[str, float]]]:
    """:func:`logit_lens` of the neuron's own output row."""
    return logit_lens(model, model.blocks[layer].mlp.W_out[neuron], k)


def neuron_stats(pair: ModelPair, layer: int, neuron: int, behaviour: Behaviour, *, split: str | None = "test",
                 batch_size: int = 16, top_n: int = 8) -> dict[str, Any]:
    """Everything :func:`neuron_card` shows, as data.

    Keys: ``activations[model][set]`` (activations on the user's tokens, ``model`` ∈ donor/target,
    ``set`` ∈ behaviour/control), ``last_token[model][set]`` (activation at each prompt's last
    token, where the answer starts), ``top_prompts[model]`` (prompts with the highest max activation,
    on the user's words, and the token where it peaks), ``template_max[model]`` (largest activation on
    the chat template's tokens, which every prompt shares: a neuron can fire there on every prompt
    and be silent on the user's words), ``logit_lens[model]`` (promoted / suppressed tokens), and
    ``weight_diff[role]`` (relative L2 change and cosine between donor and target weights).
    Several neurons: :func:`neurons_stats`, one forward pass for all of them.
    """
    return neurons_stats(pair, [(layer, neuron)], behaviour, split=split, batch_size=batch_size, top_n=top_n)[0]


def neurons_stats(pair: ModelPair, neurons: list[tuple[int, int]], behaviour: Behaviour, *,
                  split: str | None = "test", batch_size: int = 16, top_n: int = 8) -> list[dict[str, Any]]:
    """:func:`neuron_stats` of each (layer, index) in ``neurons``, from one pass of each model over each prompt set."""
    for layer, neuron in neurons:
        if not (0 <= layer < pair.n_layers and 0 <= neuron < pair.d_mlp):
            raise IndexError(f"neuron ({layer}, {neuron}) outside [{pair.n_layers}, {pair.d_mlp}]")
    tok = pair.tokenizer
    sets = {"behaviour": behaviour.batches(tok, split, batch_size)}
    try:
        sets["control"] = behaviour.control_batches(tok, split, batch_size)
    except NotImplementedError:
        pass
    stats = [{"layer": layer, "neuron": neuron, "behaviour": behaviour.name, "activations": {}, "last_token": {},
              "top_prompts": {}, "template_max": {}, "logit_lens": {}, "weight_diff": {}} for layer, neuron in neurons]
    for name, model in (("donor", pair.donor), ("target", pair.target)):
        raw = {set_name: _activations(model, batches, neurons) for set_name, batches in sets.items()}
        # the template is what every prompt of every set shares (a set's own shared ending, e.g. a trigger, is not)
        span = _template_span([ids for seqs, _, _ in raw.values() for ids in seqs])
        for j, ((layer, neuron), st) in enumerate(zip(neurons, stats)):
            st["activations"][name], st["last_token"][name] = {}, {}
            prompts: list[dict[str, Any]] = []
            template_max = []
            for set_name, (seqs, acts, last) in raw.items():
                vals, per_prompt, t_max = _on_user_words(seqs, acts[j], span, tok)
                template_max.append(t_max)
                st["activations"][name][set_name] = vals
                st["last_token"][name][set_name] = last[j]
                prompts += [{**p, "set": set_name} for p in per_prompt]
            st["top_prompts"][name] = sorted(prompts, key=lambda p: -p["max_activation"])[:top_n]
            st["template_max"][name] = max(template_max)
            st["logit_lens"][name] = _logit_lens(model, layer, neuron, top_n)
    for (layer, neuron), st in zip(neurons, stats):
        st["weight_diff"] = _weight_diff(pair.donor, pair.target, layer, neuron)
    return stats


def _weight_diff(donor: Model, target: Model, layer: int, neuron: int) -> dict[str, dict[str, float]]:
    """Per weight role of the neuron: relative L2 change from target to donor, and their cosine."""
    out = {}
    for pd, pt in zip(neuron_params(donor, layer), neuron_params(target, layer)):
        wd = pd.tensor.detach().float().select(pd.axis, neuron).flatten()
        wt = pt.tensor.detach().float().select(pt.axis, neuron).flatten()
        out[pd.role] = {"relative_change": float((wd - wt).norm() / wt.norm().clamp(min=1e-12)),
                        "cosine": float(torch.nn.functional.cosine_similarity(wd, wt, dim=0))}
    return out


def neuron_card(pair: ModelPair, layer: int, neuron: int, behaviour: Behaviour, **kwargs: Any) -> go.Figure:
    """One figure per neuron: activation distributions, top prompts, logit lens, weight change."""
    return card_figure(neuron_stats(pair, layer, neuron, behaviour, **kwargs))


def card_figure(s: dict[str, Any]) -> go.Figure:
    """The card of :func:`neuron_card` drawn from saved :func:`neuron_stats` data (no models needed)."""
    fig = make_subplots(rows=2, cols=2, vertical_spacing=0.12, horizontal_spacing=0.08,
                        specs=[[{"type": "xy"}, {"type": "table"}], [{"type": "table"}, {"type": "xy"}]],
                        subplot_titles=("activations (user's tokens)", "top-activating prompts (donor)",
                                        "logit lens of W_out row", "weights: donor vs target"))
    for model in ("target", "donor"):
        for set_name, vals in s["activations"][model].items():
            fig.add_trace(go.Violin(y=vals, name=f"{model}/{set_name}", box_visible=True, meanline_visible=True,
                                    points=False), row=1, col=1)
    top = s["top_prompts"]["donor"]
    fig.add_trace(go.Table(header={"values": ["max act", "at token", "set", "prompt"]},
                           cells={"values": [[f"{p['max_activation']:.2f}" for p in top], [p["token"] for p in top],
                                             [p["set"] for p in top], [p["text"] for p in top]]},
                           columnwidth=[1, 1, 1, 6]), row=1, col=2)
    lens = s["logit_lens"]
    fig.add_trace(go.Table(header={"values": ["donor promotes", "donor suppresses", "target promotes", "target suppresses"]},
                           cells={"values": [[t for t, _ in lens[m][d]] for m in ("donor", "target")
                                             for d in ("promoted", "suppressed")]}), row=2, col=1)
    roles = list(s["weight_diff"])
    fig.add_trace(go.Bar(x=roles, y=[s["weight_diff"][r]["relative_change"] for r in roles], name="relative L2 change"),
                  row=2, col=2)
    fig.add_trace(go.Scatter(x=roles, y=[s["weight_diff"][r]["cosine"] for r in roles], name="cosine", mode="markers",
                             marker={"size": 12}), row=2, col=2)
    title = f"neuron L{s['layer']}.{s['neuron']} — {s['behaviour']}"
    tmax = s.get("template_max", {})
    if tmax:
        title += " (max on the chat template's tokens: " + ", ".join(f"{m} {v:.3g}" for m, v in tmax.items()) + ")"
    fig.update_layout(title=title, height=760, showlegend=True)
    return fig


def inspect(pair: ModelPair, scores: NeuronScores, behaviour: Behaviour, selection: NeuronSelection | None = None,
            **card_kwargs: Any) -> Any:
    """A clickable heatmap of ``scores``: clicking a cell opens the card of that bin's best neuron.

    In Jupyter with ipywidgets this returns a ``VBox(FigureWidget, Output)``. Elsewhere (no widgets)
    it returns ``[heatmap, card of the top-scoring neuron]`` as static figures.
    """
    heat = selection_heatmap(scores, selection)
    try:
        import ipywidgets as widgets

        fig = go.FigureWidget(heat)
    except Exception:  # no ipywidgets / anywidget: static fallback
        layer, neuron = scores.top_k(1).indices()[0]
        return [heat, neuron_card(pair, layer, neuron, behaviour, **card_kwargs)]
    out = widgets.Output()

    def on_click(trace: Any, points: Any, state: Any) -> None:
        if not points.point_inds:
            return
        layer, col = points.ys[0], points.xs[0]
        layer, neuron = best_in_bin(scores, int(layer), int(col), len(trace.x))
        out.clear_output()
        with out:
            neuron_card(pair, layer, neuron, behaviour, **card_kwargs).show()

    fig.data[0].on_click(on_click)
    return widgets.VBox([fig, out])


def best_in_bin(scores: NeuronScores, layer: int, start: int, n_bins: int) -> tuple[int, int]:
    """The highest-scoring neuron of the heatmap bin that starts at neuron ``start`` in ``layer``."""
    d_mlp = scores.shape[1]
    size = d_mlp // n_bins
    chunk = scores.ranked()[layer, start:start + size]
    return layer, start + int(chunk.argmax())
