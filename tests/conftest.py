"""Shared fixtures: tiny in-process models (fast) and the bundled SmolLM2 (slow, loaded once)."""

from __future__ import annotations

from typing import Iterator

import pytest
import torch

from cnt_lens.workflow.testing import planted_pair, tiny_model


def pytest_report_header(config: pytest.Config) -> str:
    if torch.cuda.is_available():
        return f"cuda: {torch.cuda.get_device_name()} — tests marked 'cuda' run"
    return "cuda: not available — tests marked 'cuda' are deselected (run tests/test_cuda.py on a GPU machine)"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect (not skip) the CUDA tests where there is no GPU; the header and summary say so."""
    if torch.cuda.is_available():
        return
    gpu = [i for i in items if i.get_closest_marker("cuda")]
    if gpu:
        config.hook.pytest_deselected(items=gpu)
        items[:] = [i for i in items if not i.get_closest_marker("cuda")]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _no_cross_run_cache() -> Iterator[None]:
    """Each test measures its donor and target itself (tests of the cross-run cache turn it on).

    Its own ``MonkeyPatch``, not the test's: a test that calls ``monkeypatch.undo()`` must not switch on the
    machine's cross-run cache (``~/.cache/cnt_lens/measured``), whose contents depend on earlier runs.
    """
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CNT_LENS_SHARED", "0")
        yield


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
