"""Model set-ups and loaders several test files share."""
from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import torch
import torch.nn as nn


def randomize_batchnorm(model: nn.Module, seed: int, head_scale: float = 1.0) -> nn.Module:
    """BN statistics and affine away from identity (and a sharper head): masks then change logits visibly."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(1 + 0.3 * torch.randn(m.num_features, generator=g))
            m.bias.data.copy_(0.3 * torch.randn(m.num_features, generator=g))
        if isinstance(m, nn.Linear):
            m.weight.data.mul_(head_scale)
    return model


@torch.no_grad()
def batchnorm_statistics_from(model: nn.Module, images: torch.Tensor) -> nn.Module:
    """Exact BN statistics of the (masked) model on `images`: one train-mode pass with a cumulative average."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = None
    model.train()
    model(images)
    return model.eval()


def bench_script(name: str) -> ModuleType:
    """A script of bench/ (not a package) loaded as a module, e.g. bench_script("fidelity")."""
    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
