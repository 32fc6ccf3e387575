"""Triton masked activation (fastmask/ops/triton/masked_act.py) against fastmask/ops/reference.py.

On the GPU the compiled kernels run in fp32/fp16/bf16; on the CPU the same tests run under TRITON_INTERPRET=1 in
fp32 with tiny shapes (how CI checks the kernels).
"""
import importlib
import os
import sys

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # must be set before the kernels are decorated
pytest.importorskip("triton")

import fastmask as fm  # noqa: E402
from fastmask.ops import backends, reference  # noqa: E402

_NAME = "fastmask.ops.triton.masked_act"
# A module imported earlier without the interpreter holds compiled-mode kernels that cannot run on the CPU.
kernels = importlib.reload(sys.modules[_NAME]) if _NAME in sys.modules else importlib.import_module(_NAME)

DEVICE = "cuda" if HAS_CUDA else "cpu"
cuda = pytest.mark.cuda

# (groups G, images per group N, per-image shape): odd sizes, several groups, a 2-D x, 1x1 planes, an empty batch.
CASES = [
    (1, 2, (5, 3, 7)),
    (3, 2, (4, 5, 5)),
    (3, 1, (7,)),
    (2, 2, (3, 1, 1)),
    (1, 0, (4, 2, 2)),
    pytest.param(4, 8, (64, 32, 32), marks=cuda),   # ResNet18's first stage, several tiles per image
    pytest.param(3, 5, (130, 7, 7), marks=cuda),    # channels not a multiple of the channel block
    pytest.param(2, 64, (1000,), marks=cuda),       # wide 2-D
]
DTYPES = [
    (torch.float32, 1e-6, 1e-6),
    pytest.param(torch.float16, 1e-3, 1e-3, marks=cuda),
    pytest.param(torch.bfloat16, 1e-2, 1e-2, marks=cuda),
]
DCOEFFS_TOL = (1e-3, 1e-4)  # (atol, rtol): sums over N*H*W terms in another order


def _inputs(groups, per_group, shape, dtype, with_coeffs, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((groups * per_group, *shape), generator=gen).to(DEVICE, dtype)
    mask = (torch.rand((groups, *shape), generator=gen) < 0.5).to(DEVICE)
    coeffs = torch.randn((shape[0], 3), generator=gen).to(DEVICE) if with_coeffs else None
    grad = torch.randn(x.shape, generator=gen).to(DEVICE, dtype)
    return x, mask, coeffs, grad


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("with_coeffs", [False, True], ids=["identity", "polynomial"])
@pytest.mark.parametrize("groups,per_group,shape", CASES)
def test_forward_matches_reference(groups, per_group, shape, with_coeffs, dtype, atol, rtol):
    x, mask, coeffs, _ = _inputs(groups, per_group, shape, dtype, with_coeffs)
    out = kernels.forward(x, mask, coeffs)
    assert out.dtype == dtype and out.shape == x.shape
    torch.testing.assert_close(out, reference.masked_act(x, mask, coeffs), atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("with_coeffs", [False, True], ids=["identity", "polynomial"])
@pytest.mark.parametrize("groups,per_group,shape", CASES)
def test_backward_matches_reference(groups, per_group, shape, with_coeffs, dtype, atol, rtol):
    x, mask, coeffs, grad = _inputs(groups, per_group, shape, dtype, with_coeffs)
    dx, dcoeffs = kernels.backward(grad, x, mask, coeffs)
    dx_ref, dcoeffs_ref = reference.masked_act_backward(grad, x, mask, coeffs)
    assert dx.dtype == dtype
    torch.testing.assert_close(dx, dx_ref, atol=atol, rtol=rtol)
    assert dcoeffs.dtype == dcoeffs_ref.dtype and dcoeffs.shape == dcoeffs_ref.shape
    torch.testing.assert_close(dcoeffs, dcoeffs_ref, atol=DCOEFFS_TOL[0], rtol=DCOEFFS_TOL[1])


def test_each_image_uses_the_mask_of_its_group():
    """G=3, N=2: images 0-1 use mask 0 (keep all), 2-3 mask 1 (remove all), 4-5 mask 2; using mask n (or n % G)
    instead of n // N changes the result."""
    groups, per_group, shape = 3, 2, (2, 3, 3)
    x = -torch.rand((groups * per_group, *shape)).to(DEVICE) - 0.5  # all negative: ReLU and identity differ
    mask = torch.zeros((groups, *shape), dtype=torch.bool)
    mask[0] = True
    mask[2, 0] = True
    mask = mask.to(DEVICE)
    out = kernels.forward(x, mask)
    assert torch.equal(out[0:2], torch.zeros_like(out[0:2]))
    assert torch.equal(out[2:4], x[2:4])
    assert torch.equal(out[4:6, 0], torch.zeros_like(out[4:6, 0])) and torch.equal(out[4:6, 1:], x[4:6, 1:])
    grad = torch.ones_like(x)
    dx, _ = kernels.backward(grad, x, mask)
    assert torch.equal(dx[0:2], torch.zeros_like(dx[0:2])) and torch.equal(dx[2:4], grad[2:4])


def test_polynomial_uses_each_channels_coefficients():
    x = torch.full((1, 3, 2, 2), 2.0, device=DEVICE)
    mask = torch.zeros((1, 3, 2, 2), dtype=torch.bool, device=DEVICE)
    coeffs = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], device=DEVICE)
    out = kernels.forward(x, mask, coeffs)
    assert out[0, :, 0, 0].tolist() == [1.0, 2.0, 4.0]  # c0, c1*x, c2*x^2 for channels 0, 1, 2


def test_uint8_mask_treats_any_nonzero_as_keep():
    x, mask, _, _ = _inputs(2, 2, (3, 4, 4), torch.float32, False)
    as_bytes = mask.to(torch.uint8) * torch.randint(1, 255, mask.shape, device=DEVICE, dtype=torch.uint8)
    torch.testing.assert_close(kernels.forward(x, as_bytes), reference.masked_act(x, mask), atol=0, rtol=0)


def test_non_contiguous_inputs():
    x, mask, coeffs, grad = _inputs(2, 2, (6, 5, 4), torch.float32, True)
    x_t = x.transpose(2, 3).contiguous().transpose(2, 3)  # same values, other strides
    mask_t = mask.transpose(2, 3).contiguous().transpose(2, 3)
    torch.testing.assert_close(kernels.forward(x_t, mask_t, coeffs), reference.masked_act(x, mask, coeffs))
    dx, dcoeffs = kernels.backward(grad.transpose(2, 3).contiguous().transpose(2, 3), x_t, mask_t, coeffs)
    dx_ref, dcoeffs_ref = reference.masked_act_backward(grad, x, mask, coeffs)
    torch.testing.assert_close(dx, dx_ref)
    torch.testing.assert_close(dcoeffs, dcoeffs_ref, atol=DCOEFFS_TOL[0], rtol=DCOEFFS_TOL[1])


def test_empty_batch_backward_gives_zero_dcoeffs():
    x, mask, coeffs, grad = _inputs(1, 0, (4, 2, 2), torch.float32, True)
    dx, dcoeffs = kernels.backward(grad, x, mask, coeffs)
    assert dx.shape == x.shape and torch.equal(dcoeffs, torch.zeros_like(coeffs))


@pytest.mark.parametrize("with_coeffs", [False, True], ids=["identity", "polynomial"])
def test_masked_relu_dispatches_to_triton_with_autograd(monkeypatch, with_coeffs):
    """The public op with FASTMASK_BACKEND=triton: forward and autograd equal the reference's autograd."""
    monkeypatch.setenv("FASTMASK_BACKEND", "triton")
    assert backends.select(DEVICE) == backends.TRITON
    x, mask, coeffs, grad = _inputs(2, 2, (3, 4, 5), torch.float32, with_coeffs)
    leaves = [x.clone().requires_grad_(), coeffs.clone().requires_grad_() if with_coeffs else None]
    ref_leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in leaves]
    out = fm.masked_relu(leaves[0], mask, leaves[1])
    ref = reference.masked_act(ref_leaves[0], mask, ref_leaves[1])
    torch.testing.assert_close(out, ref)
    out.backward(grad)
    ref.backward(grad)
    torch.testing.assert_close(leaves[0].grad, ref_leaves[0].grad)
    if with_coeffs:
        torch.testing.assert_close(leaves[1].grad, ref_leaves[1].grad, atol=DCOEFFS_TOL[0], rtol=DCOEFFS_TOL[1])
