from __future__ import annotations

import pytest
import torch

from cnt_lens import NeuronScores, NeuronSelection


def _scores():
    v = torch.arange(12, dtype=torch.float32).view(3, 4)
    v[0, 0] = float("nan")
    return NeuronScores(v, "test")


def test_top_k_global_and_per_layer():
    s = _scores()
    assert s.top_k(3).indices() == [(2, 1), (2, 2), (2, 3)]
    assert s.top_k(1, per_layer=True).indices() == [(0, 3), (1, 3), (2, 3)]
    assert s.top_k(12).n == 12  # NaN ranks last but k can include it
    assert (0, 0) not in s.top_k(11).indices()
    assert s.top_fraction(0.25).n == 3
    assert s.above(9.5).indices() == [(2, 2), (2, 3)]
    # ranks come in layer-major order of the selection: (0, 1) holds value 1 (rank 11), (2, 3) value 11 (rank 1)
    assert s.rank_of(NeuronSelection.from_indices([(2, 3), (0, 1)], 3, 4)).tolist() == [11, 1]


def test_set_operations_and_counts():
    a = NeuronSelection.from_indices([(0, 1), (1, 2)], 3, 4)
    b = NeuronSelection.from_indices([(1, 2), (2, 0)], 3, 4)
    assert (a | b).n == 3 and (a & b).indices() == [(1, 2)] and (a - b).indices() == [(0, 1)]
    assert a.per_layer() == [1, 1, 0] and a.overlap(b) == 0.5
    with pytest.raises(ValueError, match="different shapes"):
        a | NeuronSelection.empty(2, 4)
    with pytest.raises(IndexError):
        NeuronSelection.from_indices([(3, 0)], 3, 4)


def test_json_and_safetensors_roundtrip(tmp_path):
    a = NeuronSelection.from_indices([(0, 1), (2, 3)], 3, 4)
    a.save(tmp_path / "sel.json")
    assert NeuronSelection.load(tmp_path / "sel.json") == a
    s = _scores()
    s.meta["note"] = "x"
    s.save(tmp_path / "s.safetensors")
    back = NeuronScores.load(tmp_path / "s.safetensors")
    assert torch.equal(back.values.nan_to_num(-1), s.values.nan_to_num(-1)) and back.meta["note"] == "x"


def test_shape_errors():
    # ValueError from the class's own check; TypeError (jaxtyping's TypeCheckError) when the annotated shapes are
    # checked at run time, as the test suite does
    with pytest.raises((ValueError, TypeError)):
        NeuronScores(torch.zeros(5), "x")
    with pytest.raises((ValueError, TypeError)):
        NeuronSelection(torch.zeros(2, 2, 2))


def test_annotated_shapes_are_checked_at_run_time():
    """The suite runs with jaxtyping's import hook (pyproject addopts): a wrong shape fails at the call."""
    import jaxtyping

    from cnt_lens.behaviours import sequence_logprobs
    from cnt_lens.data import Batch

    ones = torch.ones(2, 5, dtype=torch.long)
    batch = Batch(ones, ones, ones)
    with pytest.raises(jaxtyping.TypeCheckError, match="logits"):
        sequence_logprobs(torch.zeros(2, 5), batch)  # [batch, pos] where [batch, pos, vocab] is annotated
