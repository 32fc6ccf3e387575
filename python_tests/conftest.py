"""Test setup: a private decode cache, so tests never write to the user's ~/.cache. The `cuda` marker is in the
repository's root conftest.py, shared with bench/."""
import pytest


@pytest.fixture(autouse=True)
def private_decode_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTMASK_CACHE_DIR", str(tmp_path / "fastmask-cache"))
