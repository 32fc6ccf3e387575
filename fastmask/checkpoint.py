"""Model checkpoints as safetensors: weights, masks and buffers in one file, the model spec in its metadata.

No pickle is ever read. Loading checks the spec (arch, classes, image size, width) before touching any weight, so a
checkpoint made for another model fails with a message instead of a shape error.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from . import models
from .errors import FastmaskError
from .files import atomic_write
from .models import external
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
        want = expected.get(key)
        if key == "arch" and want is not None:
            want = external.canonical(want)
        if want is not None and spec.get(key) != want:
            raise FastmaskError(f"checkpoint {path} holds {key}={spec.get(key)!r} but {want!r} was asked "
                                f"for (it was made for another model: {spec})")


def build_from_spec(spec: dict) -> nn.Module:
    """A fresh model as a checkpoint's spec describes it: from the registry, or by calling its builder again and
    converting (a builder that cannot be imported now is a one-line FastmaskError naming it)."""
    if external.is_builtin(spec["arch"]):
        return models.create(spec["arch"], spec["num_classes"], spec["image_size"], width=spec["width"],
                             in_channels=spec.get("in_channels", 3), polynomial=spec.get("polynomial", False))
    return external.build(spec["arch"], spec["num_classes"], spec["image_size"], in_channels=spec.get("in_channels", 3),
                          polynomial=spec.get("polynomial", False))


def load_model(path: str | Path, expected: dict | None = None, device: str | torch.device = "cpu") -> nn.Module:
    """Builds the model the checkpoint describes and loads it. `expected` keys that differ raise FastmaskError."""
    spec, _ = read_spec(path)
    check_spec(spec, expected or {}, path)
    return load_into(build_from_spec(spec), path, spec["arch"], device)


def load_into(model: nn.Module, path: str | Path, arch: Optional[str] = None,
              device: str | torch.device = "cpu") -> nn.Module:
    """Loads a fastmask checkpoint's weights, masks and coefficients into `model` (built as its spec says, or a copy of
    the model the checkpoint was saved from); returns the model on `device`."""
    from safetensors.torch import load_file

    arch = arch or read_spec(path)[0]["arch"]
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
        raise FastmaskError(f"checkpoint {path} does not fit {arch}: {str(err).splitlines()[0]}") from err
    if missing or unexpected:
        raise FastmaskError(f"checkpoint {path} does not fit {arch}: missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]}")
    return model.to(device)


# ---- the user's weights ------------------------------------------------------------------------------------------
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


def is_fastmask_checkpoint(path: str | Path) -> bool:
    """Whether `path` is a safetensors file written by save_model (a model spec in its metadata)."""
    from safetensors import safe_open

    if Path(path).suffix != ".safetensors":
        return False
    try:
        with safe_open(str(path), framework="pt") as f:
            return SPEC_KEY in (f.metadata() or {})
    except Exception:
        return False


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state_dict the user saved: .safetensors, or .pt/.pth/.bin read with torch.load(weights_only=True), which
    never unpickles arbitrary objects. A checkpoint dict holding the state_dict under "state_dict" or "model" is
    unwrapped, and a "module." prefix (DataParallel) is dropped."""
    path = Path(path)
    if not path.is_file():
        raise FastmaskError(f"weights {path} do not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as err:
            raise FastmaskError(f"weights {path} are corrupt or not a safetensors file ({err})") from err
    if path.suffix not in WEIGHT_SUFFIXES:
        raise FastmaskError(f"weights {path}: expected a state_dict in .safetensors, .pt or .pth")
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:
        text = " ".join(str(err).split())
        if "weights_only" in text or "Unsupported global" in text or "GLOBAL" in text:
            raise FastmaskError(f"weights {path} hold a pickled object, not a state_dict, and fastmask never unpickles "
                                "code; save the weights with torch.save(model.state_dict(), path)") from None
        raise FastmaskError(f"weights {path} could not be read ({text[:200]})") from None
    if isinstance(state, dict):
        for key in ("state_dict", "model"):
            if isinstance(state.get(key), dict) and not isinstance(state.get(key), torch.Tensor):
                state = state[key]
                break
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise FastmaskError(f"weights {path} hold a {type(state).__name__}, not a state_dict of tensors; save them "
                            "with torch.save(model.state_dict(), path)")
    if all(str(k).startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def load_weights(path: str | Path, arch: str, num_classes: int, image_size: int, in_channels: int = 3,
                 polynomial: bool = False) -> nn.Module:
    """The model `arch` builds for this data, holding the user's weights from `path` (see read_state_dict)."""
    state = read_state_dict(path)
    name = f"weights {path}"
    if external.is_builtin(arch):
        model = models.create(arch, num_classes, image_size, in_channels=in_channels, polynomial=polynomial,
                              width=_builtin_width(arch, state))
        external.load_plain_weights(model, state, name, arch, allow_missing=(".mask", ".coeffs"))
        return model
    return external.build(arch, num_classes, image_size, in_channels=in_channels, polynomial=polynomial,
                          weights=state, weights_name=name)


def _builtin_width(arch: str, state: dict) -> Optional[int]:
    weight = state.get("conv1.weight")
    return int(weight.shape[0]) if isinstance(weight, torch.Tensor) and weight.dim() == 4 else None


def load_any(path: str | Path, arch: Optional[str], num_classes: int, image_size: int, in_channels: int = 3,
             device: str | torch.device = "cpu") -> nn.Module:
    """A fastmask checkpoint (its spec says what it is), or the user's state_dict for `arch`."""
    expected = {"num_classes": num_classes, "image_size": image_size, "in_channels": in_channels}
    if is_fastmask_checkpoint(path):
        return load_model(path, expected=expected, device=device)
    if arch is None:
        raise FastmaskError(f"{path} is a plain state_dict (not a fastmask checkpoint): name its model with --arch, "
                            "e.g. --arch torchvision:resnet50 or --arch my_model.py:build")
    return load_weights(path, arch, num_classes, image_size, in_channels).to(device)
