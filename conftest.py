"""pytest setup shared by python_tests/ and bench/: tests marked `cuda` (the marker is declared in pyproject.toml)
skip cleanly on a machine without a CUDA GPU."""
import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)
