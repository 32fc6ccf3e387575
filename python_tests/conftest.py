"""Shared pytest setup: the `cuda` marker, whose tests skip cleanly on a machine without a CUDA GPU, and a private
decode cache so tests never write to the user's ~/.cache."""
import pytest
import torch


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped when torch.cuda.is_available() is False)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def private_decode_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTMASK_CACHE_DIR", str(tmp_path / "fastmask-cache"))
