"""Model registry: create(arch, num_classes, image_size, width=...). Every ReLU site is a MaskedReLU.

Every model exposes stem(x), blocks (a list, in forward order) and head(x), so scoring can run blocks one by one,
and every block has fold() -> FoldedBlock, its computation with BN folded, which the fused scoring path runs.
Models from elsewhere (torchvision builders by name, the user's own builder) are in fastmask.models.external.
"""
from __future__ import annotations

from typing import Optional

import torch.nn as nn

from ..errors import FastmaskError
from .folding import FoldedAct, FoldedBlock, FoldedConv
from .resnet import ResNet18
from .wide_resnet import WideResNet22

ARCHS = {
    "resnet18": (ResNet18, 64),
    "wide_resnet22_8": (WideResNet22, 128),
}


def default_width(arch: str) -> int:
    return _lookup(arch)[1]


def _lookup(arch: str):
    if arch not in ARCHS:
        raise FastmaskError(f"unknown arch {arch!r}; choose one of {', '.join(sorted(ARCHS))}")
    return ARCHS[arch]


def create(arch: str, num_classes: int, image_size: int, width: Optional[int] = None, in_channels: int = 3,
           polynomial: bool = False) -> nn.Module:
    """A fresh model. `width` scales every layer's channels (resnet18: 64, wide_resnet22_8: 128 by default)."""
    cls, default = _lookup(arch)
    if num_classes < 2 or image_size < 4:
        raise FastmaskError(f"need num_classes >= 2 and image_size >= 4, got {num_classes} and {image_size}")
    model = cls(num_classes=num_classes, image_size=image_size, width=width or default, in_channels=in_channels,
                polynomial=polynomial)
    # The identity of a model, stored in every checkpoint so loading one into another arch fails clearly.
    model.fastmask_spec = {"arch": arch, "num_classes": num_classes, "image_size": image_size,
                           "width": width or default, "in_channels": in_channels, "polynomial": polynomial}
    return model


__all__ = ["ARCHS", "FoldedAct", "FoldedBlock", "FoldedConv", "ResNet18", "WideResNet22", "create", "default_width"]
