"""The neuron browser: every neuron a patch transplants, in one self-contained page (``neurons.html``).

:func:`browser_data` measures the neurons on the *patched* target (the model that now carries them):
per neuron its score and rank, how far the patch moves its weights, its activation on each text set,
the estimated effect of ablating it, an activation histogram per set, its top-activating texts with
an activation per token (the prompt and the model's answer, and a general-text corpus), and the
logit lens of the transplanted change. :func:`write_neuron_browser` turns that into a page with a
sortable, filterable table whose rows open each neuron's card — plain HTML, CSS and a little
JavaScript: no server, no widget library, no request leaving the machine.

The card reads a neuron as CircuitsVis and Neuronpedia do: which tokens it fires on, in context.
Activations are ``hook_post`` values (after the MLP's non-linearity), in the model's own units, read from each
text's second token on (the first, which has no context, fires alike in every text).
"""

from __future__ import annotations

import html
import json
from functools import partial
from pathlib import Path
from typing import Any

import torch
from einops import reduce
from jaxtyping import Float
from torch import Tensor

from cnt_lens.behaviours.base import Behaviour
from cnt_lens.core.files import atomic_write_text
from cnt_lens.data.prompt_set import load_prompts
from cnt_lens.data.tokens import chat_format, chunks, encode
from cnt_lens.method.scoring.common import forward
from cnt_lens.method.selection import NeuronScores, hook_name
from cnt_lens.method.transplant import NeuronPatch
from cnt_lens.models.forward import Model, device_of
from cnt_lens.models.pair import ModelPair
from cnt_lens.show.activations import sequence_activations
from cnt_lens.show.inspector import logit_lens_rows

__all__ = ["ablation_effects", "browser_data", "texts_from_items", "write_neuron_browser"]

N_BINS = 16
"""Bins of each neuron's activation histogram (shared by its text sets)."""


def texts_from_items(items: list[dict[str, Any]], tokenizer: Any, model: str = "patched",
                     limit: int = 64) -> dict[str, list[str]]:
    """Each prompt set's chat-formatted prompt followed by ``model``'s answer, from a run's ``items.jsonl`` rows.

    Up to ``limit`` texts per set (``harmful``, ``harmless``, …), in file order.
    """
    out: dict[str, list[str]] = {}
    for item in items:
        if item.get("model") == model and "prompt" in item and "response" in item:
            texts = out.setdefault(str(item.get("set", "prompts")), [])
            if len(texts) < limit:
                texts.append(chat_format(tokenizer, item["prompt"]) + item["response"])
    return out


def ablation_effects(model: Model, behaviour: Behaviour, batches: list, neurons: list[tuple[int, int]]) -> Tensor:
    """First-order change of the mean ``behaviour.metric`` per prompt if each neuron were zeroed: ``[n_neurons]``.

    ``−Σ_pos a · ∂m/∂a`` at ``hook_post`` (attribution patching toward zero), one forward and backward
    per batch; negative: ablating the neuron lowers the metric (e.g. refusal log-odds).
    """
    layers = sorted({layer for layer, _ in neurons})
    cols = {layer: [n for lay, n in neurons if lay == layer] for layer in layers}
    acc = {layer: torch.zeros(len(cols[layer])) for layer in layers}
    n_items = 0
    for b in batches:
        b = b.to(device_of(model))
        store: dict[int, Tensor] = {}

        def keep(x: Tensor, hook: Any, layer: int) -> None:
            x.retain_grad()
            store[layer] = x

        hooks = [("hook_embed", lambda x, hook: x.detach().requires_grad_(True))]
        hooks += [(hook_name(layer, "hook_post"), partial(keep, layer=layer)) for layer in layers]
        with torch.enable_grad():
            metric = behaviour.metric(forward(model, b, behaviour, hooks), b).float()
            metric.sum().backward()
        mask = b.attention_mask[..., None].float()
        for layer in layers:
            a, g = store[layer][..., cols[layer]], store[layer].grad[..., cols[layer]]
            acc[layer] -= (a * g * mask).detach().sum((0, 1)).float().cpu()
        n_items += metric.numel()
    flat = {(layer, n): float(v) for layer in layers for n, v in zip(cols[layer], acc[layer] / max(n_items, 1))}
    return torch.tensor([flat[x] for x in neurons])


def _weight_change(patch: NeuronPatch) -> Float[Tensor, " n"]:
    """Per selected neuron (layer-major): ``‖d − t‖ / max(‖d‖, ‖t‖)`` over all its weights, in [0, 2].

    Dividing by the larger norm keeps a neuron the target barely had (``t ≈ 0``) at a readable 1, not 10¹².
    """
    out = []
    for layer in sorted(patch.donor):
        d = torch.cat([w.float().reshape(len(w), -1) for _, w in sorted(patch.donor[layer].items())], dim=1)
        t = torch.cat([w.float().reshape(len(w), -1) for _, w in sorted(patch.target[layer].items())], dim=1)
        out.append((d - t).norm(dim=1) / torch.maximum(d.norm(dim=1), t.norm(dim=1)).clamp(min=1e-12))
    return torch.cat(out)


def _change_lens(model: Model, patch: NeuronPatch, k: int) -> list[dict[str, Any]]:
    """Per selected neuron: the tokens the transplanted change of its output row (donor − target) promotes / lowers."""
    rows = torch.cat([patch.donor[layer]["W_out"].float() - patch.target[layer]["W_out"].float()
                      for layer in sorted(patch.donor)])  # [neurons, d_model], layer-major
    changed = (rows.abs().amax(dim=-1) > 0).nonzero().squeeze(-1).tolist()
    lens = dict(zip(changed, logit_lens_rows(model, rows[changed], k))) if changed else {}
    return [lens.get(j, {"promoted": [], "suppressed": [], "unchanged": True}) for j in range(len(rows))]


def _histograms(maxima: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
    """Shared bin edges ``[n, N_BINS + 1]`` per neuron and each set's counts ``[n, N_BINS]`` of per-text maxima."""
    lo = torch.stack([m.min(0).values for m in maxima.values()]).min(0).values
    hi = torch.stack([m.max(0).values for m in maxima.values()]).max(0).values
    width = ((hi - lo) / N_BINS).clamp(min=1e-6)
    edges = lo[:, None] + width[:, None] * torch.arange(N_BINS + 1)
    counts = {}
    for name, m in maxima.items():  # m: [texts, n]
        idx = ((m - lo) / width).floor().long().clamp(0, N_BINS - 1)  # [texts, n]
        counts[name] = torch.zeros(m.shape[1], N_BINS, dtype=torch.long).scatter_add_(
            1, idx.T.contiguous(), torch.ones_like(idx.T))
    return edges, counts


def _examples(tok: Any, ids: list[list[int]], acts: list[Tensor], maxima: Tensor, j: int, top: int,
              before: int = 30, after: int = 12) -> list[dict[str, Any]]:
    """The ``top`` texts of one set where neuron ``j`` peaks: a window of tokens and activations around the peak."""
    out = []
    for t in maxima[:, j].argsort(descending=True)[:top].tolist():
        a = acts[t][:, j]
        peak = int(a.argmax())
        lo, hi = max(0, peak - before), min(len(ids[t]), peak + after + 1)
        out.append({"tokens": [tok.decode([i]) for i in ids[t][lo:hi]], "acts": [round(float(x), 3) for x in a[lo:hi]],
                    "peak": peak - lo, "cut_left": lo > 0, "cut_right": hi < len(ids[t])})
    return out


def browser_data(pair: ModelPair, behaviour: Behaviour, patch: NeuronPatch, scores: NeuronScores | None = None, *,
                 texts: dict[str, list[str]] | None = None, batch_size: int = 16, top: int = 3,
                 lens_k: int = 6) -> dict[str, Any]:
    """Everything ``neurons.html`` shows, as JSON-ready data, measured with ``patch`` applied to ``pair.target``.

    ``texts``: named text sets (e.g. :func:`texts_from_items` of the run: prompts with the patched
    model's answers); the bundled ``general`` corpus is always added. Ablation effects are read on the
    behaviour's validation prompts (:func:`ablation_effects`).
    """
    neurons = patch.selection.indices()
    tok = pair.tokenizer
    sets = {**(texts or {}), "general text": load_prompts("general").column("text")}
    ids, acts, maxima, means = {}, {}, {}, {}
    with patch.applied(pair.target):
        for name, items in sets.items():
            batches = [encode(tok, chunk) for chunk in chunks(items, batch_size)]
            seq_ids, seq_acts = sequence_activations(pair.target, batches, neurons)  # acts: [len, n] per text
            # a text's first token has no context and draws outsized activations in every text alike (an
            # attention sink): it is left out, so maxima and examples show what the neuron reads
            ids[name], acts[name] = [i[1:] or i for i in seq_ids], [a[1:] if len(a) > 1 else a for a in seq_acts]
            maxima[name] = torch.stack([reduce(a, "pos n -> n", "max") for a in acts[name]])  # [texts, n]
            means[name] = maxima[name].mean(0)
        effects = ablation_effects(pair.target, behaviour, behaviour.batches(tok, "validation", batch_size), neurons)
        lens = _change_lens(pair.target, patch, lens_k)
    edges, counts = _histograms(maxima)
    ranks = scores.rank_of(patch.selection).tolist() if scores is not None else [None] * len(neurons)
    values = [float(scores.values[layer, n]) for layer, n in neurons] if scores is not None else [None] * len(neurons)
    change = _weight_change(patch).tolist()
    rows = []
    for j, (layer, n) in enumerate(neurons):
        rows.append({"layer": layer, "neuron": n, "score": values[j], "rank": ranks[j], "weight_change": change[j],
                     "activation": {s: float(means[s][j]) for s in sets}, "ablation": float(effects[j]),
                     "hist": {"edges": [round(float(x), 4) for x in edges[j]],
                              "counts": {s: counts[s][j].tolist() for s in sets}},
                     "examples": {s: _examples(tok, ids[s], acts[s], maxima[s], j, top) for s in sets},
                     "lens": lens[j]})
    return {"behaviour": behaviour.name, "alpha": patch.alpha, "method": scores.method if scores else None,
            "n_total": patch.selection.mask.numel(), "sets": list(sets), "neurons": rows,
            "model": str(getattr(pair.target, "cnt_source", "")), "metric": behaviour.headline}


_STYLE = """body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}table{border-collapse:collapse;font-size:.85em}
th,td{padding:.25em .6em;border-bottom:1px solid #ddd;text-align:right}th{cursor:pointer;background:#f6f6f6;position:sticky;top:0}
td:first-child,th:first-child{text-align:left}tr.row:hover{background:#eef4ff;cursor:pointer}tr.open{background:#e3ecff}
#wrap{display:flex;gap:1.5em;align-items:flex-start}#list{max-height:88vh;overflow:auto;flex:0 0 auto}
#card{flex:1;min-width:420px;position:sticky;top:0;max-height:88vh;overflow:auto}.tok{white-space:pre;border-radius:2px}
.peak{outline:2px solid #333}.ex{font-family:ui-monospace,monospace;font-size:.8em;line-height:1.7;margin:.3em 0 .8em;
word-break:break-word}.lens span{display:inline-block;margin:.1em .3em;padding:0 .3em;background:#f0f0f0;border-radius:3px;
font-family:ui-monospace,monospace}h3{margin:.9em 0 .3em}.muted{color:#777;font-size:.85em}input{font-size:1em;padding:.2em}"""

_SCRIPT = """const D=JSON.parse(document.getElementById('data').textContent);const sets=D.sets;
const cols=[['neuron','neuron',r=>'L'+r.layer+'.'+r.neuron,r=>r.layer*1e6+r.neuron],['rank','rank',r=>r.rank??'',r=>r.rank??1e12],
['score','score',r=>fmt(r.score),r=>r.score??-1e12],['weight change','weight_change',r=>fmt(r.weight_change),r=>r.weight_change],
...sets.map(s=>['act: '+s,'a:'+s,r=>fmt(r.activation[s]),r=>r.activation[s]]),
['ablation effect (est.)','ablation',r=>fmt(r.ablation),r=>r.ablation]];
function fmt(x){if(x===null||x===undefined)return '';const a=Math.abs(x);return a>=100||a<0.01&&a>0?x.toExponential(2):x.toFixed(3)}
let sortBy=1,desc=false,open=null;const head=document.getElementById('head'),body=document.getElementById('body');
head.innerHTML='';cols.forEach((c,i)=>{const th=document.createElement('th');th.textContent=c[0];th.title='sort';
th.onclick=()=>{desc=sortBy===i?!desc:(i>1);sortBy=i;draw()};head.appendChild(th)});
function draw(){const q=document.getElementById('filter').value.trim().toLowerCase();
let rows=D.neurons.map((r,i)=>[r,i]).filter(([r])=>!q||('l'+r.layer+'.'+r.neuron).startsWith(q)||('l'+r.layer+'.'+r.neuron)===q);
rows.sort((a,b)=>{const x=cols[sortBy][3](a[0]),y=cols[sortBy][3](b[0]);return desc?y-x:x-y});
body.innerHTML='';rows.forEach(([r,i])=>{const tr=document.createElement('tr');tr.className='row'+(i===open?' open':'');
tr.id='n-'+r.layer+'-'+r.neuron;cols.forEach(c=>{const td=document.createElement('td');td.textContent=c[2](r);tr.appendChild(td)});
tr.onclick=()=>{open=i;card(r);draw()};body.appendChild(tr)});document.getElementById('count').textContent=rows.length+' of '+D.neurons.length}
function colour(a,m){const v=Math.max(-1,Math.min(1,a/(m||1)));return v>=0?`rgba(230,85,13,${v.toFixed(3)})`:`rgba(49,130,189,${(-v).toFixed(3)})`}
function el(tag,text,cls){const e=document.createElement(tag);if(text!==undefined)e.textContent=text;if(cls)e.className=cls;return e}
function hist(h){const W=360,H=90,n=h.edges.length-1,max=Math.max(1,...sets.flatMap(s=>h.counts[s]));const bw=W/n/sets.length;
const pal=['#ff7f0e','#9467bd','#7f7f7f','#8c564b','#17becf'];let svg=`<svg width="${W+10}" height="${H+34}" role="img">`;
sets.forEach((s,k)=>h.counts[s].forEach((c,b)=>{const hh=H*c/max;svg+=`<rect x="${b*W/n+k*bw}" y="${H-hh}" width="${bw}" height="${hh}" fill="${pal[k%5]}"><title>${esc(s)}: ${c}</title></rect>`}));
svg+=`<text x="0" y="${H+14}" font-size="10">${fmt(h.edges[0])}</text><text x="${W-40}" y="${H+14}" font-size="10">${fmt(h.edges[n])}</text>`;
sets.forEach((s,k)=>{svg+=`<rect x="${k*120}" y="${H+20}" width="10" height="10" fill="${pal[k%5]}"/><text x="${k*120+14}" y="${H+29}" font-size="10">${esc(s)}</text>`});
const box=el('div');box.innerHTML=svg+'</svg>';return box}
function esc(s){return String(s).replace(/[&<>"]/g,c=>({'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;'})[c])}
function card(r){const c=document.getElementById('card');c.innerHTML='';c.appendChild(el('h2','L'+r.layer+'.'+r.neuron));
c.appendChild(el('p',`rank ${r.rank??'–'} by ${D.method??'–'}; score ${fmt(r.score)}; weight change ${fmt(r.weight_change)}; ablation effect on ${D.metric} ${fmt(r.ablation)} (est.)`,'muted'));
c.appendChild(el('h3','Activation per text (its largest), by set'));c.appendChild(hist(r.hist));
c.appendChild(el('h3','Logit lens of the transplanted change (donor − target output row)'));
if(r.lens.unchanged)c.appendChild(el('p','The patch leaves the output row of this neuron as it was: it changes what the neuron reads, not what it writes.','muted'));
['promoted','suppressed'].forEach(k=>{const p=el('div','','lens');p.appendChild(el('b',k+': '));(r.lens[k]||[]).forEach(([t,v])=>{const s=el('span',JSON.stringify(t));s.title=fmt(v);p.appendChild(s)});c.appendChild(p)});
sets.forEach(s=>{c.appendChild(el('h3','Top texts: '+s));(r.examples[s]||[]).forEach(ex=>{const m=Math.max(...ex.acts.map(Math.abs));
const d=el('div','','ex');if(ex.cut_left)d.appendChild(el('span','… '));ex.tokens.forEach((t,k)=>{const sp=el('span',t,'tok'+(k===ex.peak?' peak':''));
sp.style.background=colour(ex.acts[k],m);sp.title=fmt(ex.acts[k]);d.appendChild(sp)});if(ex.cut_right)d.appendChild(el('span',' …'));
c.appendChild(d)})})}
document.getElementById('filter').oninput=draw;draw();const first=location.hash.slice(1).split('-');
const pick=D.neurons.findIndex(r=>first.length===3&&r.layer==first[1]&&r.neuron==first[2]);
if(D.neurons.length){open=pick>=0?pick:D.neurons.reduce((b,r,i)=>(r.rank??1e12)<(D.neurons[b].rank??1e12)?i:b,0);card(D.neurons[open]);draw()}"""


def write_neuron_browser(run_dir: str | Path, data: dict[str, Any]) -> Path:
    """Write ``run_dir/neurons.json`` (the data) and ``run_dir/neurons.html`` (the page); return the page's path."""
    run = Path(run_dir)
    payload = json.dumps(data, separators=(",", ":"))
    atomic_write_text(run / "neurons.json", payload)
    safe = payload.replace("</", "<\\/")  # nothing in the data can close the script element
    n = len(data["neurons"])
    title = f"cnt_lens neurons: {html.escape(data['behaviour'])}"
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{title}</title><style>{_STYLE}</style></head><body>
<h1>{title}</h1><p>{n} neurons ({n / max(data['n_total'], 1):.2%} of {data['n_total']} MLP neurons) transplanted at
alpha {data['alpha']:g} (each neuron's weights set to the target's plus {data['alpha']:g} × the donor's difference), measured on
the patched model. Activations: the neuron's largest <code>hook_post</code> value in each text, averaged over a set;
weight change: ‖donor − target‖ / max(‖donor‖, ‖target‖) over its weights; ablation effect: first-order change of
the mean {html.escape(str(data['metric']))} metric if the neuron were zeroed. Click a column to sort, a row to open
its card; filter by <code>L12</code> or <code>L12.345</code>.</p>
<p><input id="filter" placeholder="filter: L12 or L12.345"> <span id="count" class="muted"></span></p>
<div id="wrap"><div id="list"><table><thead><tr id="head"></tr></thead><tbody id="body"></tbody></table></div>
<div id="card"></div></div><script type="application/json" id="data">{safe}</script><script>{_SCRIPT}</script></body></html>"""
    return atomic_write_text(run / "neurons.html", page)
