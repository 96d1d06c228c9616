"""Shared fixtures: tiny in-process models (fast) and the bundled SmolLM2 (slow, loaded once)."""

from __future__ import annotations

import pytest
import torch

from cnt_lens.testing import planted_pair, tiny_model


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(params=["llama", "gpt2"])
def arch(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def tiny(arch: str):
    return tiny_model(arch, seed=0)


@pytest.fixture
def planted(arch: str):
    return planted_pair(arch, n_planted=6, seed=0)


@pytest.fixture(scope="session")
def smollm2():
    from cnt_lens import load_model

    return load_model("smollm2-135m-instruct")
