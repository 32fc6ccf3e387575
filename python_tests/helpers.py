"""Model set-ups and loaders several test files share."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
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


def randomized(model: nn.Module, seed: int, removed_fraction: float = 0.5) -> nn.Module:
    """BN statistics and affine away from the identity, conv biases nonzero, `removed_fraction` of the ReLUs removed
    at random; eval mode."""
    from fastmask.masks import MaskSet

    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            c = module.num_features
            module.running_mean.copy_(torch.rand(c, generator=generator) - 0.5)
            module.running_var.copy_(torch.rand(c, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(c, generator=generator) + 0.5)
            module.bias.data.copy_(torch.rand(c, generator=generator) - 0.5)
        if isinstance(module, nn.Conv2d) and module.bias is not None:
            module.bias.data.copy_(torch.rand(module.out_channels, generator=generator) - 0.5)
    masks = MaskSet(model)
    masks.remove(torch.randperm(masks.total(), generator=generator)[: int(masks.total() * removed_fraction)])
    return model.eval()


def run_with_interpreted_triton(script: str, done: str) -> None:
    """Runs `script` in a fresh process with the Triton kernels interpreted on the CPU (TRITON_INTERPRET=1 is read
    when triton.jit decorates them) and FASTMASK_BACKEND=triton; fails unless it exits 0 having printed `done`."""
    env = dict(os.environ, TRITON_INTERPRET="1", FASTMASK_BACKEND="triton", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert done in result.stdout


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
