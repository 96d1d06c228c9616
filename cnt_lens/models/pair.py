"""A donor and a target that fit, checked once in :func:`load_pair`.

Same architecture, same tokenization, finite weights; :class:`ModelPair` is what every method takes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

from cnt_lens.models.forward import Model, model_tokenizer
from cnt_lens.models.loading import IncompatibleModelsError, load_model
from cnt_lens.models.neurons import DonorWeights, is_streamed, neuron_params

__all__ = ["ModelPair", "architecture", "check_compatible", "load_pair"]


def _activation_name(model: Model) -> str:
    return str(model.cfg.act_fn)


def architecture(model: Model | DonorWeights) -> dict[str, Any]:
    """The shape facts a transplant depends on: layers, widths, MLP kind, activation, vocabulary."""
    if is_streamed(model):
        return model.architecture()
    cfg = model.cfg
    return {
        "n_layers": int(cfg.n_layers),
        "d_model": int(cfg.d_model),
        "d_mlp": int(cfg.d_mlp),
        "gated_mlp": bool(getattr(cfg, "gated_mlp", False)),
        "act_fn": _activation_name(model),
        "d_vocab": int(cfg.d_vocab),
        "mlp_bias": any(p.role == "b_in" for p in neuron_params(model, 0)),
    }


def check_compatible(donor: dict | Model | DonorWeights, target: dict | TransformerBridge) -> None:
    """Raise :class:`IncompatibleModelsError` naming every field where the two architectures differ."""
    a = donor if isinstance(donor, dict) else architecture(donor)
    b = target if isinstance(target, dict) else architecture(target)
    diffs = [f"{k}: donor={a.get(k)!r} target={b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    if diffs:
        raise IncompatibleModelsError("Donor and target are not transplant-compatible: " + "; ".join(diffs))


@dataclass
class ModelPair:
    """A donor (the function is taken from it) and a target (it is put into), checked compatible.

    The donor is a loaded model, or weights only (:class:`DonorWeights`, e.g. a
    :class:`~cnt_lens.models.streamed.StreamedDonor`) for the steps that need no donor forward pass.
    """

    donor: Model | DonorWeights
    target: Model

    def __post_init__(self) -> None:
        if self.donor is self.target:
            raise ValueError("donor and target are the same object; use clone_model() for a copy")
        check_compatible(self.donor, self.target)
        check_same_tokenization(self.donor, self.target)
        for side, model in (("donor", self.donor), ("target", self.target)):
            if not is_streamed(model):  # a streamed donor's tensors are checked as they are read (NeuronPatch)
                require_finite_weights(model, side)

    @property
    def n_layers(self) -> int:
        """Number of transformer blocks."""
        return int(self.target.cfg.n_layers)

    @property
    def d_mlp(self) -> int:
        """MLP hidden width (neurons per layer)."""
        return int(self.target.cfg.d_mlp)

    @property
    def n_neurons(self) -> int:
        """MLP neurons in all layers: ``n_layers * d_mlp``."""
        return self.n_layers * self.d_mlp

    @property
    def tokenizer(self) -> Any:
        """The target's tokenizer (donor and target must tokenize alike; checked on construction)."""
        return model_tokenizer(self.target)

    def to(self, device: str | torch.device) -> ModelPair:
        """Move target and donor to ``device`` (a streamed donor stays on disk and reads onto the target's); ``self``."""
        if not is_streamed(self.donor):
            self.donor.to(device)
        self.target.to(device)
        return self

    def __repr__(self) -> str:
        arch = getattr(self.target.cfg, "original_architecture", None) or type(self.target.original_model).__name__
        return (f"ModelPair(donor={str(getattr(self.donor, 'cnt_source', '?'))!r}, "
                f"target={str(getattr(self.target, 'cnt_source', '?'))!r}, {arch}, n_layers={self.n_layers}, "
                f"d_mlp={self.d_mlp})")

    def swapped(self) -> "ModelPair":
        """The same two models with roles exchanged (function deletion ↔ addition)."""
        return ModelPair(donor=self.target, target=self.donor)


TOKENIZER_PROBE = ("The quick brown fox — 12,345 naïve cafés; ¿por qué? 日本語のテキスト. \tdef f(x): return x**2\n"
                   "<|im_start|>user How do I pick a lock?<|im_end|> 🙂")
"""Text both models of a pair must tokenize to the same ids: words, digits, accents, CJK, code, chat markers, emoji."""


def check_same_tokenization(donor: Any, target: Any) -> None:
    """Raise :class:`IncompatibleModelsError` unless both tokenizers give :data:`TOKENIZER_PROBE` the same ids.

    A transplant copies neurons that read and write token ids' embeddings: a donor whose tokenizer maps the same
    words to other ids has learned its function over other inputs. A weights-only donor has no tokenizer: skipped.
    """
    if is_streamed(donor):
        return
    tok_d, tok_t = model_tokenizer(donor), model_tokenizer(target)
    if tok_d is None or tok_t is None or tok_d is tok_t:
        return
    ids_d, ids_t = (list(t(TOKENIZER_PROBE, add_special_tokens=False)["input_ids"]) for t in (tok_d, tok_t))
    if ids_d != ids_t:
        i = next((i for i, (a, b) in enumerate(zip(ids_d, ids_t)) if a != b), min(len(ids_d), len(ids_t)))
        raise IncompatibleModelsError(
            f"donor and target tokenize the same text differently (from token {i}: donor "
            f"{ids_d[i:i + 4]} {tok_d.convert_ids_to_tokens(ids_d[i:i + 4])}, target {ids_t[i:i + 4]} "
            f"{tok_t.convert_ids_to_tokens(ids_t[i:i + 4])}): a transplant needs one vocabulary; load both with "
            "the same tokenizer (e.g. the base model's)")


def first_non_finite(named: Sequence[tuple[Any, Tensor]]) -> Any | None:
    """The name of the first tensor in ``named`` holding NaN or inf, or ``None``.

    One float64 sum per tensor and one synchronisation (a NaN or inf anywhere makes its tensor's sum non-finite);
    only if that fails is each tensor checked element by element, so finite values whose sum overflows pass.
    """
    if not named:
        return None
    sums = [t.detach().sum(dtype=torch.float64) for _, t in named]
    if bool(torch.isfinite(torch.stack([x.to(sums[0].device) for x in sums])).all()):  # a model spread over devices
        return None
    return next((name for name, t in named if not bool(torch.isfinite(t.detach()).all())), None)


def require_finite_weights(model: torch.nn.Module, side: str = "model") -> None:
    """Raise ``ValueError`` naming the first parameter of ``model`` that holds NaN or inf (offloaded ones skipped)."""
    params = [(n, p) for n, p in model.named_parameters() if p.device.type != "meta" and p.is_floating_point()]
    bad = first_non_finite(params)
    if bad is not None:
        raise ValueError(f"the {side} ({getattr(model, 'cnt_source', type(model).__name__)}) holds NaN or inf in "
                         f"{bad}: its checkpoint is damaged or comes from a diverged run; load another")


def load_pair(donor: Any, target: Any, **kwargs: Any) -> ModelPair:
    """Load both models with :func:`load_model` and check that they fit (see :func:`check_compatible`)."""
    return ModelPair(donor=load_model(donor, **kwargs), target=load_model(target, **kwargs))
