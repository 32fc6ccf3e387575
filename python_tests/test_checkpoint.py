"""Checkpoints: safetensors only, spec checked before any weight is touched."""
import pytest
import torch

import fastmask as fm
from fastmask.checkpoint import load_model, read_spec, save_model
from fastmask.errors import FastmaskError


def test_round_trip_keeps_weights_masks_and_spec(tmp_path):
    model = fm.models.create("resnet18", 10, 8, width=4)
    fm.MaskSet(model).remove(torch.arange(0, 100))
    path = tmp_path / "m.safetensors"
    save_model(model, path, extra={"note": "x"})
    spec, extra = read_spec(path)
    assert spec["arch"] == "resnet18" and extra == {"note": "x"}
    loaded = load_model(path, expected={"arch": "resnet18", "num_classes": 10})
    assert fm.relu_count(loaded) == fm.relu_count(model)
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(loaded.eval()(x), model.eval()(x))


def test_wrong_arch_or_classes_fails_clearly(tmp_path):
    path = tmp_path / "m.safetensors"
    save_model(fm.models.create("resnet18", 10, 8, width=4), path)
    with pytest.raises(FastmaskError, match="arch"):
        load_model(path, expected={"arch": "wide_resnet22_8"})
    with pytest.raises(FastmaskError, match="num_classes"):
        load_model(path, expected={"num_classes": 100})


def test_missing_and_corrupt_checkpoints(tmp_path):
    with pytest.raises(FastmaskError, match="does not exist"):
        load_model(tmp_path / "nope.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(FastmaskError, match="corrupt"):
        load_model(bad)


def test_pickle_checkpoints_are_refused(tmp_path):
    path = tmp_path / "m.pt"
    torch.save(fm.models.create("resnet18", 10, 8, width=4).state_dict(), path)
    with pytest.raises(FastmaskError):
        load_model(path)
