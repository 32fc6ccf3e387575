"""Model checkpoints as safetensors: weights, masks and buffers in one file, the model spec in its metadata.

No pickle is ever read. Loading checks the spec (arch, classes, image size, width) before touching any weight, so a
checkpoint made for another model fails with a message instead of a shape error.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from . import models
from .errors import FastmaskError
from .files import atomic_write
from .nn import masked_sites

SPEC_KEY = "fastmask_spec"


def model_spec(model: nn.Module) -> dict:
    """The model's identity (arch, classes, image size, width, ...), set by fastmask.models.create."""
    spec = getattr(model, "fastmask_spec", None)
    if not isinstance(spec, dict) or "arch" not in spec:
        raise FastmaskError(f"{type(model).__name__} has no fastmask model spec, so it could not be rebuilt from a "
                            "checkpoint; build it with fastmask.models.create")
    return spec


def save_model(model: nn.Module, path: str | Path, extra: dict | None = None) -> None:
    """Writes atomically, so a kill never leaves a half-written checkpoint."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    metadata = {SPEC_KEY: json.dumps(model_spec(model)), "extra": json.dumps(extra or {})}
    with atomic_write(path) as tmp:
        save_file(state, str(tmp), metadata=metadata)


def read_spec(path: str | Path) -> tuple[dict, dict]:
    """(model spec, extra) stored in a checkpoint's metadata."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FastmaskError(f"checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as err:
        raise FastmaskError(f"checkpoint {path} is corrupt or not a safetensors file ({err})") from err
    if SPEC_KEY not in meta:
        raise FastmaskError(f"checkpoint {path} was not written by fastmask (no model spec in its metadata)")
    return json.loads(meta[SPEC_KEY]), json.loads(meta.get("extra", "{}"))


def check_spec(spec: dict, expected: dict, path: str | Path) -> None:
    for key in ("arch", "num_classes", "image_size", "width", "in_channels"):
        if key in expected and expected[key] is not None and spec.get(key) != expected[key]:
            raise FastmaskError(f"checkpoint {path} holds {key}={spec.get(key)!r} but {expected[key]!r} was asked "
                                f"for (it was made for another model: {spec})")


def load_model(path: str | Path, expected: dict | None = None, device: str | torch.device = "cpu") -> nn.Module:
    """Builds the model the checkpoint describes and loads it. `expected` keys that differ raise FastmaskError."""
    from safetensors.torch import load_file

    spec, _ = read_spec(path)
    check_spec(spec, expected or {}, path)
    model = models.create(spec["arch"], spec["num_classes"], spec["image_size"], width=spec["width"],
                          in_channels=spec.get("in_channels", 3), polynomial=spec.get("polynomial", False))
    try:
        state = load_file(str(path))
    except Exception as err:
        raise FastmaskError(f"checkpoint {path} is corrupt ({err})") from err
    for name, site in masked_sites(model):
        # a site that holds coefficients in the file keeps them, whether or not a new model would give it some
        # (checkpoints from before polynomials were limited to sites with a normalized input)
        saved = state.get(f"{name}.coeffs")
        if site.coeffs is None and saved is not None and saved.shape == (site.shape[0], 3):
            site.coeffs = nn.Parameter(torch.zeros_like(saved))
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatch: the spec lied about the weights
        raise FastmaskError(f"checkpoint {path} does not fit {spec['arch']}: {str(err).splitlines()[0]}") from err
    if missing or unexpected:
        raise FastmaskError(f"checkpoint {path} does not fit {spec['arch']}: missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]}")
    return model.to(device)
