"""Test setup: Triton kernels run through the interpreter when there is no GPU, and a private decode cache, so tests
never write to the user's ~/.cache. The `cuda` marker's skip is in the repository's root conftest.py, shared with
bench/."""
import os

import pytest
import torch

# Triton picks interpreted or compiled kernels when they are decorated, so this must precede the collection of any test
# module that imports them. An explicit TRITON_INTERPRET wins.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def private_decode_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTMASK_CACHE_DIR", str(tmp_path / "fastmask-cache"))


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny-model tests: as fast alone, and far faster on a busy machine (two threads
    spin-waiting for each other on a loaded 2-core runner made each conv take milliseconds)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
