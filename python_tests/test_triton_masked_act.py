"""What is particular to the Triton masked activation (fastmask/ops/triton/masked_act.py), its kernels called
directly: the mask group of each image, per-channel coefficients, uint8 masks, an empty batch.

Its agreement with fastmask/ops/reference.py on every shape and dtype is checked with the other backends in
test_masked_act.py. On the GPU these run the compiled kernels; on the CPU they run under TRITON_INTERPRET=1, which
python_tests/conftest.py sets before collection when there is no GPU.
"""
import pytest
import torch

from fastmask.ops import backends, reference

kernels = pytest.importorskip("fastmask.ops.triton.masked_act")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not backends.triton_supports(DEVICE),
                                reason="Triton on the CPU needs TRITON_INTERPRET=1 before the kernels are imported")


def _inputs(groups, per_group, shape, dtype, with_coeffs, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((groups * per_group, *shape), generator=gen).to(DEVICE, dtype)
    mask = (torch.rand((groups, *shape), generator=gen) < 0.5).to(DEVICE)
    coeffs = torch.randn((shape[0], 3), generator=gen).to(DEVICE) if with_coeffs else None
    grad = torch.randn(x.shape, generator=gen).to(DEVICE, dtype)
    return x, mask, coeffs, grad


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


def test_empty_batch_backward_gives_zero_dcoeffs():
    x, mask, coeffs, grad = _inputs(1, 0, (4, 2, 2), torch.float32, True)
    dx, dcoeffs = kernels.backward(grad, x, mask, coeffs)
    assert dx.shape == x.shape and torch.equal(dcoeffs, torch.zeros_like(coeffs))
