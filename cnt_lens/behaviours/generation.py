"""Greedy generation for evaluation, and the canary that checks it works.

KV-cached through the plain HF model under the bridge, batched by length, verified against the
hooked model's own forward, and stopped for a row as soon as the judge's verdict is final.
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar
from functools import partial
from typing import Any, Callable, Iterable, Iterator

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from cnt_lens.core.errors import CntLensError
from cnt_lens.core.progress import progress_bar
from cnt_lens.core.timing import stage
from cnt_lens.data.tokens import Batch, chat_format, chunks, encode, split_shared_prefix
from cnt_lens.models.forward import Model, context_length, device_of, logits_of, model_tokenizer, takes_logits_to_keep
from cnt_lens.models.hf import plain_hf_model

__all__ = ["GenerationError", "canary", "first_token_logprobs", "generate", "verify_greedy"]


def maybe_progress(iterable: Any, total: int, desc: str, progress: bool) -> Any:
    return progress_bar(iterable, total=total, desc=desc, leave=False, enabled=progress, min_total=2)


class GenerationError(CntLensError, RuntimeError):
    """Greedy generation disagrees with the model's own forward pass (a library or cache fault)."""


def _greedy_tolerance(dtype: torch.dtype) -> float:
    """How far (in logits) a generated token may sit below the forward pass's best one: float noise only."""
    return 1e-3 if dtype in (torch.float32, torch.float64) else 0.25


def verify_greedy(model: Model, prompt: Batch, generated: Int[Tensor, "batch new"], *, stop_ids: set[int],
                  lengths: Int[Tensor, " batch"] | None = None, rows: int | None = 4) -> None:
    """Check that ``generated`` is what greedy decoding with ``model``'s own forward pass gives.

    One teacher-forced forward over prompt + generated tokens (no KV cache, through the bridge):
    each generated token, up to its row's first EOS, must be the argmax of the logits before it
    (within float noise). Raises :class:`GenerationError` naming the row, the position and the
    versions in play — the symptom of transformers 5.24's bridge + KV-cache fault. ``lengths``: each
    row's generated tokens end there at the latest (answers cut short by :func:`generate`'s ``until``).

    ``rows``: how many rows are checked (``None``: all). The ones where a fault of the cached path
    shows are taken (:func:`_rows_to_verify`): the most and the least left-padded prompt and the
    longest and the shortest answer (a row that stayed in the batch after others left it, and one
    that left first). Only the generated positions are unembedded, so the check costs a few rows'
    forward pass instead of the whole batch's at every position.
    """
    new = generated.shape[1]
    stop = torch.isin(generated, torch.tensor(sorted(stop_ids), dtype=generated.dtype, device=generated.device))
    real = (stop.long().cumsum(-1) - stop.long()) == 0  # every token up to and including the first stop token
    if lengths is not None:
        real &= torch.arange(new, device=generated.device) < lengths.to(generated.device)[:, None]
    pick = _rows_to_verify(prompt.attention_mask, real, rows)
    prompt_tokens, prompt_mask, generated, real = (prompt.tokens[pick], prompt.attention_mask[pick],
                                                    generated[pick], real[pick])
    tokens = torch.cat([prompt_tokens, generated], 1)
    mask = torch.cat([prompt_mask, real.long()], 1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = logits_of(model, tokens, {"attention_mask": mask, "position_ids": positions},
                           keep=new + 1)[:, -new - 1:-1].float()
    best = logits.max(-1).values
    chosen = logits.gather(-1, generated.unsqueeze(-1)).squeeze(-1)
    bad = real & (chosen < best - _greedy_tolerance(next(model.parameters()).dtype))
    if bad.any():
        i, pos = (int(v) for v in bad.nonzero()[0])
        import transformers

        raise GenerationError(
            f"greedy generation disagrees with the model's forward pass (row {int(pick[i])}, new token {pos}: "
            f"generated {int(generated[i, pos])}, forward's argmax {int(logits[i, pos].argmax())}). The KV-cached path "
            f"is broken under transformers {transformers.__version__}; install the pinned set "
            "(bash scripts/setup, constraints.txt) and see README, 'Generation'."
        )


def _rows_to_verify(prompt_mask: Int[Tensor, "batch pos"], real: Bool[Tensor, "batch new"],
                    rows: int | None) -> Int[Tensor, " picked"]:
    """Up to ``rows`` batch rows for :func:`verify_greedy` (sorted, distinct; every row when ``None`` or enough).

    First the most and the least left-padded prompt (padding and positions), then the longest and the
    shortest answer (the KV cache after other rows left the batch, and a row that left it), then
    evenly spaced rows.
    """
    n = prompt_mask.shape[0]
    if rows is None or rows >= n:
        return torch.arange(n, device=prompt_mask.device)
    if rows < 1:
        raise ValueError(f"verify_greedy checks at least one row, got rows={rows}")
    width, answer = prompt_mask.sum(-1), real.sum(-1)
    first = [width.argmin(), width.argmax(), answer.argmax(), answer.argmin()]
    order = [int(i) for i in first] + torch.linspace(0, n - 1, rows).round().long().tolist()
    return torch.tensor(sorted(list(dict.fromkeys(order))[:rows]), device=prompt_mask.device)


#: inputs (token ids) whose next-token log-probabilities a :func:`first_token_logprobs` block waits for
_WATCHED: ContextVar[dict[tuple[int, ...], Tensor | None] | None] = ContextVar("first_token_logprobs", default=None)


@contextlib.contextmanager
def first_token_logprobs(inputs: Iterable[tuple[int, ...]]) -> Iterator[dict[tuple[int, ...], Tensor | None]]:
    """Within the block, :func:`generate` keeps the next-token log-probabilities of ``inputs`` from its prompt pass.

    ``inputs``: token ids without padding (:meth:`~cnt_lens.data.Batch.row_ids`). Yields a dict from each
    of them to its ``[vocab]`` log-probabilities (fp32, CPU) once a generation has run that prompt, else
    ``None``. A first-token KL on prompts that an evaluation generates from then needs no pass of its own
    (:meth:`~cnt_lens.method.divergence.KLReference.of`); a prompt encoded otherwise (truncated) stays ``None``.
    """
    seen: dict[tuple[int, ...], Tensor | None] = dict.fromkeys(inputs)
    token = _WATCHED.set(seen)
    try:
        yield seen
    finally:
        _WATCHED.reset(token)


def _keep_first(seen: dict[tuple[int, ...], Tensor | None], b: Batch, logits: Float[Tensor, "batch vocab"]) -> None:
    """Store the next-token log-probabilities of the rows of ``b`` that ``seen`` waits for."""
    for row, ids in enumerate(b.row_ids()):
        if ids in seen:
            seen[ids] = torch.log_softmax(logits[row].float(), dim=-1).cpu()


def _stop_ids(tokenizer: Any, hf_model: Any) -> set[int]:
    """Token ids that end a generation: the tokenizer's EOS and the generation config's (int or list)."""
    ids = {tokenizer.eos_token_id}
    cfg_eos = getattr(getattr(hf_model, "generation_config", None), "eos_token_id", None)
    ids |= set(cfg_eos) if isinstance(cfg_eos, (list, tuple)) else {cfg_eos}
    return {int(i) for i in ids if i is not None}


def generate(
    model: Model,
    prompts: list[str],
    *,
    max_new_tokens: int = 48,
    batch_size: int = 16,
    progress: bool = True,
    verify: bool = True,
    until: Callable[[str], bool] | None = None,
) -> list[str]:
    """Greedy completions of already-formatted prompts (left-padded batches, KV cache, rows leave when done).

    Batches are formed from prompts sorted by token length (answers come back in the input order), so a
    short prompt is not padded to a long one's width; left padding with explicit positions makes each answer its
    prompt's own (up to float rounding).

    Runs a plain HF module bound to the bridge's own weight tensors (:func:`~cnt_lens.models.plain_hf_model`):
    transplants are seen, and the bridge's wrappers never touch the KV cache. With ``verify`` the first
    batch is checked against the bridge's forward pass (:func:`verify_greedy`; one extra forward of a few of
    its rows), so a broken generation path raises instead of yielding garbage that reads as "no refusal".
    Prompts are truncated to leave room for ``max_new_tokens`` in the model's context.

    Decoding is this module's own greedy loop (:func:`_greedy_until`), which gives HF ``generate``'s greedy
    answers (``tests/test_generation.py``, every tested family) at less cost: a row that has stopped leaves
    the batch and its KV cache (HF ``generate`` computes it to the end of the batch's longest answer), and a
    chat template's system prompt, shared by every row, is run once per batch. ``until(text) -> bool``
    (e.g. :func:`~cnt_lens.behaviours.judge.verdict_is_final`) also ends an answer as soon as it holds for the answer
    so far; answers then end where ``until`` held (or at EOS, or ``max_new_tokens``).
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1 (how many tokens each answer may have), got "
                         f"{max_new_tokens!r}: with none, no answer could be judged")
    tok = model_tokenizer(model)
    plain = plain_hf_model(model)
    room = context_length(model) - max_new_tokens
    if room < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in a "
                         f"{context_length(model)}-token context")
    order = _by_length(tok, prompts)
    stop_ids = _stop_ids(tok, plain)
    out: list[str] = [""] * len(prompts)
    batches = list(chunks(order, batch_size))
    done = None if until is None else (lambda ids: until(tok.decode(ids, skip_special_tokens=True)))
    seen = _WATCHED.get()
    with stage("generate"):
        for i, rows in enumerate(maybe_progress(batches, len(batches), "generate", progress)):
            b = encode(tok, [prompts[j] for j in rows], max_len=room).to(device_of(model))
            first = partial(_keep_first, seen, b) if seen else None
            with torch.no_grad():
                gen, lengths = _greedy_until(plain, b, max_new_tokens, sorted(stop_ids), done, first)
            if verify and i == 0:
                with stage("verify"):
                    verify_greedy(model, b, gen, stop_ids=stop_ids, lengths=lengths)
            for j, text in zip(rows, tok.batch_decode(gen, skip_special_tokens=True)):
                out[j] = text
    return out


def _greedy_until(plain: torch.nn.Module, b: Batch, max_new_tokens: int, stop_ids: list[int],
                  done: Callable[[list[int]], bool] | None = None,
                  first: Callable[[Tensor], None] | None = None,
                  ) -> tuple[Int[Tensor, "batch new"], Int[Tensor, " batch"]]:
    """Greedy decoding of a left-padded batch, each row leaving the batch once it stops or ``done(its ids)``.

    Returns the new tokens, each row filled with ``stop_ids[0]`` after its last one (decoding ends it
    there), and each row's number of generated tokens (for :func:`verify_greedy`). ``first`` gets the prompt
    pass's last logits ``[batch, vocab]`` (the first token's distribution). Rows leave the KV
    cache as they finish (``Cache.batch_select_indices``); a row's logits depend only on its own tokens,
    so the answers are those of the whole batch, up to float rounding.
    """
    n = len(b)
    out = torch.full((n, max_new_tokens), stop_ids[0], dtype=b.tokens.dtype, device=b.tokens.device)
    stops = torch.tensor(stop_ids, device=b.tokens.device)
    lengths = torch.full((n,), max_new_tokens, dtype=torch.long)
    rows = torch.arange(n, device=b.tokens.device)  # the batch rows still decoding
    step, mask = _prefill(plain, b)
    if first is not None:
        first(step.logits[:, -1])
    cache, pos = step.past_key_values, b.position_ids[:, -1:]
    for t in range(max_new_tokens):
        nxt = step.logits[:, -1].argmax(-1)
        out[rows, t] = nxt
        live = ~torch.isin(nxt, stops)
        if done is not None:
            so_far = out[rows, :t + 1].tolist()  # one copy to the host per step, not one per row
            live &= torch.tensor([not done(ids) for ids in so_far], device=live.device)
        lengths[rows[~live].cpu()] = t + 1
        if t + 1 == max_new_tokens or not live.any():
            break
        if not live.all():
            keep = live.nonzero().squeeze(-1)
            cache.batch_select_indices(keep)
            rows, nxt, mask, pos = rows[keep], nxt[keep], mask[keep], pos[keep]
        mask = torch.cat([mask, mask.new_ones(len(rows), 1)], 1)
        pos = pos + 1
        step = plain(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos, past_key_values=cache,
                     use_cache=True)
    return out, lengths


def _prefill(plain: torch.nn.Module, b: Batch, min_shared: int = 8) -> tuple[Any, Int[Tensor, "batch pos"]]:
    """The prompt pass of :func:`_greedy_until`: its output (logits, KV cache) and the attention mask it used.

    When every prompt starts with the same ``P ≥ min_shared`` tokens (a chat template's system prompt),
    they run once and their KV cache is shared by every row (:func:`~cnt_lens.data.split_shared_prefix`),
    so each row's logits are its own prompt's, up to float rounding. Only the last position's logits are
    computed (``logits_to_keep=1``, where the model takes it): the unembedding of every prompt token is a
    fifth of a small model's prompt pass.
    """
    last = {"logits_to_keep": 1} if takes_logits_to_keep(plain) else {}
    split = split_shared_prefix(b, min_shared)
    if split is None:
        return plain(input_ids=b.tokens, attention_mask=b.attention_mask, position_ids=b.position_ids,
                     use_cache=True, **last), b.attention_mask
    cache = plain(input_ids=split.head, use_cache=True, **last).past_key_values
    cache.batch_repeat_interleave(len(b))
    return plain(input_ids=split.tail, attention_mask=split.mask, position_ids=split.positions,
                 past_key_values=cache, use_cache=True, **last), split.mask


def _by_length(tokenizer: Any, prompts: list[str]) -> list[int]:
    """Prompt indices from shortest to longest in tokens (stable), so a batch pads to similar lengths."""
    lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]] if prompts else []
    return sorted(range(len(prompts)), key=lengths.__getitem__)


def canary(model: Model, prompt: str = "What is the capital of France?", expect: str | None = None, *,
           max_new_tokens: int = 12) -> str:
    """A few seconds' check that ``model`` answers sanely before any long stage; returns the answer.

    The greedy answer is verified against the model's own forward pass (:func:`verify_greedy`), which
    catches a broken generation path on any model; with ``expect`` (e.g. ``"Paris"`` for a real chat
    model) the answer must also contain it.
    """
    answer = generate(model, [chat_format(model_tokenizer(model), prompt)], max_new_tokens=max_new_tokens,
                      progress=False)[0]
    if expect is not None and expect.lower() not in answer.lower():
        raise GenerationError(f"canary: asked {prompt!r}, {getattr(model, 'cnt_source', 'the model')} answered "
                              f"{answer!r} (no {expect!r}); the model or the generation path is broken")
    return answer
