"""Tiny in-process models and planted-function pairs, for tests and documentation. No downloads.

:func:`planted_pair` builds a target and a donor that differ in exactly a known set of MLP neurons,
which carry a known behaviour (:class:`MarkerBehaviour`: after the trigger word ``bomb`` the
donor predicts ``sorry``). The planted neurons are the ground truth every scorer is tested against.

Example:
    >>> from cnt_lens.workflow.testing import planted_pair
    >>> pair, behaviour, planted = planted_pair("llama", n_planted=6, seed=0)
    >>> planted.n
    6
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor
from typing_extensions import override

from cnt_lens.behaviours.base import Behaviour
from cnt_lens.core.stats import rate
from cnt_lens.data.prompt_set import PromptSet, load_prompts
from cnt_lens.data.tokens import Batch, chunks, encode
from cnt_lens.method.selection import NeuronSelection
from cnt_lens.models.forward import Model, device_of, model_tokenizer
from cnt_lens.models.loading import TESTED_FAMILIES, load_model
from cnt_lens.models.neurons import mlp_hidden, neuron_params
from cnt_lens.models.pair import ModelPair

__all__ = ["TINY_ARCHS", "EstimatedMarker", "MarkerBehaviour", "planted_pair", "tiny_hf_model", "tiny_model", "tiny_pair", "tiny_tokenizer"]

TRIGGER, MARKER, CONTROL = "bomb", "sorry", "cake"
_SPECIAL = ["<pad>", "<s>", "</s>", "<unk>", "<user>", "<assistant>"]
_CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


@lru_cache(maxsize=1)
def tiny_tokenizer() -> Any:
    """A word-level tokenizer over the words of the bundled prompt sets (≈2k tokens), with a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words: set[str] = {TRIGGER, MARKER, CONTROL, "A", "B", "C", "D", "Sure", "Here", "Sorry", "I", "As", "Answer",
                       "Unfortunately", "Certainly", "Of", "To", "The", "Step", "First", "You", "Yes"}
    for name in ("harmful", "harmless", "bias_pairs", "bias_templates", "mc", "reference"):
        for r in load_prompts(name):
            for v in r.values():
                for s in v if isinstance(v, list) else [v]:
                    if isinstance(s, str):
                        words.update(re.findall(r"\w+|[^\w\s]", s))
    vocab = {w: i for i, w in enumerate(_SPECIAL + sorted(words - set(_SPECIAL)))}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        additional_special_tokens=["<user>", "<assistant>"], name_or_path="cnt-lens-tiny",
    )
    tok.chat_template = _CHAT_TEMPLATE
    tok.add_bos_token = True  # TransformerLens re-wraps tokenizers lacking this flag through the hub
    return tok


TINY_ARCHS = ("llama", "gpt2")
"""The two architectures most tests run on: gated SiLU + RMSNorm (Llama) and GELU + LayerNorm with biases (GPT-2).
:func:`tiny_hf_model` builds every family in :data:`~cnt_lens.models.TESTED_FAMILIES`."""

_WIDTH_FIELD = {"gpt2": "n_inner", "opt": "ffn_dim", "falcon": "ffn_hidden_size"}  # the MLP width's config name
_GROUPED_KV = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "stablelm", "olmo"}
_EXPLICIT_HEAD_DIM = {"qwen3", "gemma", "gemma2", "gemma3_text"}


def tiny_hf_model(arch: str = "llama", *, seed: int = 0, n_layers: int = 2, d_model: int = 32, d_mlp: int = 48,
                  n_heads: int = 4, vocab_size: int | None = None, tie_embeddings: bool | None = None) -> Any:
    """The plain, randomly initialised HF model of family ``arch`` (an HF ``model_type``) that :func:`tiny_model` wraps.

    ``arch`` is one of :data:`~cnt_lens.models.TESTED_FAMILIES`; the vocabulary is :func:`tiny_tokenizer`'s.
    ``tie_embeddings`` overrides the family's default (a random model with tied embeddings tends to repeat
    the prompt's last token, which for a chat prompt is a special token that decodes to nothing).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    if arch not in TESTED_FAMILIES:
        raise ValueError(f"unknown tiny architecture {arch!r}; one of {TESTED_FAMILIES}")
    tok = tiny_tokenizer()
    fields: dict[str, Any] = {
        "vocab_size": vocab_size or len(tok), "hidden_size": d_model, "num_hidden_layers": n_layers,
        "num_attention_heads": n_heads, "max_position_embeddings": 256, _WIDTH_FIELD.get(arch, "intermediate_size"): d_mlp,
        "pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
    }
    if arch in _GROUPED_KV:
        fields["num_key_value_heads"] = n_heads // 2
    if arch in _EXPLICIT_HEAD_DIM:
        fields["head_dim"] = d_model // n_heads
    if arch == "opt":
        fields["word_embed_proj_dim"] = d_model
    if tie_embeddings is not None:
        fields["tie_word_embeddings"] = tie_embeddings
    cfg = AutoConfig.for_model(arch, **fields)
    torch.manual_seed(seed)
    hf = AutoModelForCausalLM._model_mapping[type(cfg)](cfg)
    hf.generation_config.pad_token_id = tok.pad_token_id
    return hf.eval()


def tiny_model(arch: str = "llama", *, seed: int = 0, **kwargs: Any) -> Any:
    """A randomly initialised tiny bridge of family ``arch`` (:func:`tiny_hf_model`'s keywords)."""
    return load_model(tiny_hf_model(arch, seed=seed, **kwargs), tokenizer=tiny_tokenizer())


def tiny_pair(arch: str = "llama", *, seeds: tuple[int, int] = (1, 0), **kwargs: Any) -> ModelPair:
    """Two independently initialised tiny models of the same shape (donor seed, target seed)."""
    return ModelPair(donor=tiny_model(arch, seed=seeds[0], **kwargs), target=tiny_model(arch, seed=seeds[1], **kwargs))


def _word_prompts(suffix: str) -> PromptSet:
    base = load_prompts("harmless")
    rows = tuple({**r, "prompt": f"{r['prompt']} {suffix}"} for r in base)
    return PromptSet(name=f"marker-{suffix}", kind="prompt", records=rows)


@dataclass(repr=False)
class MarkerBehaviour(Behaviour):
    """Predicting ``marker`` as the next token after prompts that end in the trigger word.

    Metric: ``log p(marker)`` at the last position. Evaluation: ``marker_rate``, the share of
    trigger prompts whose greedy next token is the marker, and ``marker_rate_control`` on controls.
    """

    prompts: PromptSet = field(default_factory=lambda: _word_prompts(TRIGGER))
    controls: PromptSet = field(default_factory=lambda: _word_prompts(CONTROL))
    marker: str = MARKER
    name: str = "marker"
    headline: str = "marker_rate"

    def _batches(self, tokenizer: Any, ps: PromptSet, split: str | None, batch_size: int) -> list[Batch]:
        mid = tokenizer.convert_tokens_to_ids(self.marker)
        return [encode(tokenizer, list(c), add_bos=True, meta={"marker_id": mid})
                for c in chunks(ps.split(split).column("prompt"), batch_size)]

    @override
    def batches(self, tokenizer: Any, split: str | None, batch_size: int) -> list[Batch]:
        return self._batches(tokenizer, self.prompts, split, batch_size)

    @override
    def control_batches(self, tokenizer: Any, split: str | None, batch_size: int) -> list[Batch]:
        return self._batches(tokenizer, self.controls, split, batch_size)

    @override
    def kl_batches(self, tokenizer: Any, split: str | None, batch_size: int) -> list[Batch]:
        return self.control_batches(tokenizer, split, batch_size)

    @override
    def logits_to_keep(self, batch: Batch) -> int:
        return 1

    @override
    def metric(self, logits: Float[Tensor, "batch pos vocab"], batch: Batch) -> Float[Tensor, " batch"]:
        return logits[:, -1].float().log_softmax(-1)[:, batch.meta["marker_id"]]

    @override
    def evaluate_items(self, model: Model, split: str | None, *, batch_size: int = 16,
                       progress: bool = True) -> list[dict[str, Any]]:
        tok = model_tokenizer(model)
        items = []
        for kind, ps in (("trigger", self.prompts), ("control", self.controls)):
            recs = ps.split(split).records
            for lo, b in zip(range(0, len(recs), batch_size), self._batches(tok, ps, split, batch_size)):
                b = b.to(device_of(model))
                with torch.no_grad():
                    pred = model(b.tokens, **b.model_kwargs())[:, -1].argmax(-1)
                hits = (pred == b.meta["marker_id"]).tolist()
                items += [{"id": r["id"], "set": kind, "category": r["category"], "prompt": r["prompt"],
                           "response": tok.decode([t]), "marked": h}
                          for r, h, t in zip(recs[lo:lo + batch_size], hits, pred.tolist())]
        return items

    @override
    def aggregate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        return {**rate("marker_rate", [i["marked"] for i in items if i["set"] == "trigger"]),
                **rate("marker_rate_control", [i["marked"] for i in items if i["set"] == "control"])}


@dataclass
class EstimatedMarker(MarkerBehaviour):
    """:class:`MarkerBehaviour` with a one-pass estimate that is not its evaluation, for screened searches.

    The estimate counts a prompt when the marker's logit is within ``margin`` (nats) of the best
    other next token's; the evaluation, when it is the top one. With ``margin > 0`` the estimate is
    optimistic: it reaches a goal with fewer neurons than the evaluation, as an opening-based refusal
    estimate does. With ``margin < 0`` it is pessimistic (the marker must lead by ``-margin``): it can
    miss every patched model the evaluation counts, as an estimate reading another part of the
    behaviour than the ranking did.
    """

    margin: float = 0.1

    @override
    def estimate_items(self, model: Model, split: str | None, *, batch_size: int = 16,
                       progress: bool = True) -> list[dict[str, Any]]:
        items = []
        for kind, ps in (("trigger", self.prompts), ("control", self.controls)):
            below: list[float] = []
            for b in self._batches(model_tokenizer(model), ps, split, batch_size):
                b = b.to(device_of(model))
                with torch.no_grad():
                    last = model(b.tokens, **b.model_kwargs())[:, -1].float()
                marker = last[:, b.meta["marker_id"]].clone()
                last[:, b.meta["marker_id"]] = float("-inf")
                below += (last.max(-1).values - marker).tolist()  # the best other token's lead
            items += [{"id": r["id"], "set": kind, "category": r["category"], "marked": g < self.margin}
                      for r, g in zip(ps.split(split).records, below)]
        return items


def planted_pair(
    arch: str = "llama",
    *,
    n_planted: int = 8,
    seed: int = 0,
    layers: list[int] | None = None,
    rewire_out: bool = False,
    strength: float = 3.0,
    **model_kwargs: Any,
) -> tuple[ModelPair, MarkerBehaviour, NeuronSelection]:
    """A tiny (target, donor) pair whose behavioural difference lives in ``n_planted`` known neurons.

    In both models the planted neurons' output rows (``W_out``) point along the unembedding
    direction of ``sorry``; in the target they read random input directions (near silent), in the
    donor they read the ``bomb`` embedding (they fire after the trigger). So copying the planted
    neurons' weights — and nothing else — gives the target the donor's behaviour. With
    ``rewire_out=True`` the target's planted output rows stay random: only a weight-space scorer
    can then see them (activation attribution reads the target's output row).

    Returns ``(pair, behaviour, planted_selection)``. ``layers`` restricts where neurons are planted.
    """
    target = tiny_model(arch, seed=seed, **model_kwargs)
    donor = tiny_model(arch, seed=seed, **model_kwargs)
    n_layers, d_mlp = int(target.cfg.n_layers), int(target.cfg.d_mlp)
    layers = list(range(n_layers)) if layers is None else layers
    mask = _planted_mask(n_layers, d_mlp, layers, n_planted, seed)
    tok = model_tokenizer(target)
    hf = target.original_model
    emb = hf.get_input_embeddings().weight.detach()
    read = emb[tok.convert_tokens_to_ids(TRIGGER)]
    read = read / read.norm()
    unemb = hf.get_output_embeddings().weight.detach()
    write = unemb[tok.convert_tokens_to_ids(MARKER)] - unemb.mean(0)
    write = write / write.norm()
    behaviour = MarkerBehaviour()
    # Calibrate: the planted neurons together shift the final residual by `strength` times its norm,
    # so one neuron alone moves the behaviour only part of the way (no saturation).
    resid_norm = _final_resid_norm(target, behaviour.batches(tok, "train", 64)[0])
    _write_rows(donor, mask, {"W_in": read * 2.0, "W_gate": read * 2.0, "b_in": -1.0})  # donor reads the trigger
    # Activation of a planted donor neuron on the trigger token (the residual there ≈ its embedding).
    x = torch.nn.functional.normalize(read, dim=0) * (read.numel() ** 0.5)
    act = float(mlp_hidden(donor, layers[0], x)[mask[layers[0]]].mean()) if mask[layers[0]].any() else 1.0
    write = write * strength * resid_norm / (max(abs(act), 1e-3) * n_planted)
    for model in ([donor] if rewire_out else [donor, target]):
        _write_rows(model, mask, {"W_out": write})
    pair = ModelPair(donor=donor, target=target)
    return pair, behaviour, NeuronSelection(mask)


def _planted_mask(n_layers: int, d_mlp: int, layers: list[int], n_planted: int, seed: int) -> Bool[Tensor, "n_layers d_mlp"]:
    """``n_planted`` neurons drawn without replacement from ``layers`` (seeded)."""
    gen = torch.Generator().manual_seed(10_000 + seed)
    cells = torch.randperm(len(layers) * d_mlp, generator=gen)[:n_planted]
    mask = torch.zeros(n_layers, d_mlp, dtype=torch.bool)
    for c in cells.tolist():
        mask[layers[c // d_mlp], c % d_mlp] = True
    return mask


def _final_resid_norm(model: Model, batch: Batch) -> float:
    """Mean norm of the last layer's residual stream at the last token of ``batch``."""
    store: dict[str, Tensor] = {}
    name = f"blocks.{int(model.cfg.n_layers) - 1}.hook_resid_post"
    with torch.no_grad():
        model.run_with_hooks(batch.tokens, fwd_hooks=[(name, lambda x, hook: store.__setitem__("r", x))],
                             **batch.model_kwargs())
    return float(store["r"][:, -1].norm(dim=-1).mean())


def _write_rows(model: Model, mask: Bool[Tensor, "n_layers d_mlp"], values: dict[str, Tensor | float]) -> None:
    """Set the masked neurons' entries of each weight role in ``values`` (roles a model lacks are skipped)."""
    with torch.no_grad():
        for layer in range(mask.shape[0]):
            idx = mask[layer].nonzero().squeeze(-1)
            for p in neuron_params(model, layer) if idx.numel() else []:
                if p.role in values:
                    p.tensor.movedim(p.axis, 0)[idx] = values[p.role]
