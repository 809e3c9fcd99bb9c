"""Shared by the transformers tests: offline hub access, and zero-copy checks."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the variable once, at import.
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True, raising=False)


def arena(model: torch.nn.Module) -> tuple[int, int]:
    """Start and size of the one arena mapping every parameter lies in."""
    storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    assert len(storages) == 1, "the parameters are not views of one arena"
    storage = next(model.parameters()).untyped_storage()
    return storage.data_ptr(), storage.nbytes()


def assert_zero_copy(model: torch.nn.Module) -> None:
    start, size = arena(model)
    assert size >= model._tensorferry.total_bytes  # type: ignore[operator]
    for name, p in model.named_parameters(remove_duplicate=False):
        assert start <= p.data_ptr(), name
        assert p.data_ptr() + p.nbytes <= start + size, name
        assert not p.requires_grad, name
