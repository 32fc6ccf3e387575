"""masked_act: every backend present (C++ CPU, CUDA, Triton, PyTorch) against fastmask/ops/reference.py.

This is the one place every backend, Triton included, is checked against the reference; test_triton_masked_act.py
holds what is particular to the Triton kernels. Also: torch.library.opcheck on the custom ops, fp64 (gradcheck and an
exact fp64 formula), the compiled ops called directly (empty batch, non-contiguous grad, mixed coeffs dtype, bad
input), MaskedReLU, and fastmask.backend().
Triton runs on the CPU only under TRITON_INTERPRET=1 (python_tests/conftest.py sets it when there is no GPU), in fp32
and fp64.
"""
from __future__ import annotations

import importlib
import os

import pytest
import torch

import fastmask
from fastmask.ops import backends, reference

# (atol, rtol) per dtype; every backend computes in fp32 (fp64 in fp64) and rounds once, so these are one-ulp bounds.
TOLERANCES = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-3, 1e-3), torch.bfloat16: (1e-2, 1e-2)}

# Shapes of one mask group: [N, C, H, W] or [N, D]. x is [G*N, ...]. Odd sizes, a vector-aligned map, 2-D inputs,
# 1x1 planes; on the GPU also maps of several kernel tiles, channels off the block sizes, and a wide 2-D input.
GROUP_SHAPES = [
    pytest.param((5, 7, 5, 3), id="5x7x5x3"),
    pytest.param((2, 16, 8, 8), id="2x16x8x8"),
    pytest.param((4, 10), id="4x10"),
    pytest.param((3, 33), id="3x33"),
    pytest.param((2, 3, 1, 1), id="2x3x1x1"),
    pytest.param((8, 64, 32, 32), id="8x64x32x32", marks=pytest.mark.cuda),
    pytest.param((5, 130, 7, 7), id="5x130x7x7", marks=pytest.mark.cuda),
    pytest.param((64, 1000), id="64x1000", marks=pytest.mark.cuda),
]
TRITON_INTERPRETED = backends.triton_interpreting()


def triton_kernels_present() -> bool:
    if not backends.triton_available():
        return False
    try:
        importlib.import_module("fastmask.ops.triton.masked_act")
    except ImportError:
        return False
    return True


def extension_has_cuda() -> bool:
    ext = backends.extension()
    return ext is not None and ext.built_with_cuda()


def backend_cases():
    """(device, backend) pairs to run; those that need something absent here are skipped with the reason."""
    no_ext = pytest.mark.skipif(backends.extension() is None, reason="fastmask._C is not built")
    no_triton = pytest.mark.skipif(not triton_kernels_present(), reason="Triton kernels not importable")
    no_interpreter = pytest.mark.skipif(not TRITON_INTERPRETED, reason="Triton on CPU needs TRITON_INTERPRET=1")
    no_cuda_ext = pytest.mark.skipif(not extension_has_cuda(), reason="fastmask._C was built without CUDA")
    return [
        pytest.param("cpu", backends.TORCH, id="cpu-torch"),
        pytest.param("cpu", backends.EXT, id="cpu-ext", marks=no_ext),
        pytest.param("cpu", backends.TRITON, id="cpu-triton", marks=[no_triton, no_interpreter]),
        pytest.param("cuda", backends.TORCH, id="cuda-torch", marks=pytest.mark.cuda),
        pytest.param("cuda", backends.EXT, id="cuda-ext", marks=[pytest.mark.cuda, no_cuda_ext]),
        pytest.param("cuda", backends.TRITON, id="cuda-triton", marks=[pytest.mark.cuda, no_triton]),
    ]


def use_backend(monkeypatch, device: str, backend: str) -> None:
    """Forces FASTMASK_BACKEND for this test and checks the dispatcher really picks it (no silent fallback)."""
    monkeypatch.setenv("FASTMASK_BACKEND", backend)
    assert backends.select(device) == backend


def make_case(group_shape, groups, dtype, with_coeffs, mask_dtype, device, seed=0):
    """x [G*N, ...], mask [G, ...], coeffs [C, 3] or None, and a grad_output, all made on the CPU then moved."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((groups * group_shape[0], *group_shape[1:]), generator=gen).to(dtype)
    keep = torch.rand((groups, *group_shape[1:]), generator=gen) > 0.5
    if mask_dtype == torch.uint8:  # any nonzero byte keeps the ReLU, as mask.bool() does in the reference
        mask = keep.to(torch.uint8) * torch.randint(1, 8, keep.shape, generator=gen, dtype=torch.uint8)
    else:
        mask = keep
    coeffs = torch.randn(group_shape[1], 3, generator=gen).to(dtype) if with_coeffs else None
    grad = torch.randn(x.shape, generator=gen).to(dtype)
    return tuple(None if t is None else t.to(device) for t in (x, mask, coeffs, grad))


def assert_close(actual, expected, dtype):
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


def assert_sums_close(actual, expected, dtype, terms: int):
    """dcoeffs are sums over `terms` elements in an order each backend picks, so atol grows like sqrt(terms)."""
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(actual, expected, atol=atol * max(terms, 1) ** 0.5, rtol=rtol)


def check_against_reference(x, mask, coeffs, grad):
    """Forward and backward through fastmask.masked_relu (autograd included) vs the reference, same grad_output;
    the backward op also directly, since autograd would cast a gradient of the wrong dtype without a word."""
    x_leaf = x.detach().clone().requires_grad_(True)
    coeffs_leaf = None if coeffs is None else coeffs.detach().clone().requires_grad_(True)
    out = fastmask.masked_relu(x_leaf, mask, coeffs_leaf)
    out.backward(grad)
    expected = reference.masked_act(x, mask, coeffs)
    expected_dx, expected_dcoeffs = reference.masked_act_backward(grad, x, mask, coeffs)
    assert out.dtype == x.dtype and out.shape == x.shape
    assert_close(out, expected, x.dtype)
    assert_close(x_leaf.grad, expected_dx, x.dtype)
    if coeffs is not None:
        assert coeffs_leaf.grad.dtype == coeffs.dtype
        assert_sums_close(coeffs_leaf.grad, expected_dcoeffs, coeffs.dtype, x.numel() // x.shape[1])
    dx, dcoeffs = torch.ops.fastmask.masked_act_backward(grad, x, mask, coeffs)
    assert dx.dtype == x.dtype and dx.shape == x.shape
    assert dcoeffs.dtype == expected_dcoeffs.dtype and dcoeffs.shape == expected_dcoeffs.shape


@pytest.mark.parametrize("device, backend", backend_cases())
@pytest.mark.parametrize("group_shape", GROUP_SHAPES)
@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("with_coeffs", [False, True], ids=["identity", "poly"])
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.uint8], ids=["bool", "uint8"])
def test_backend_matches_reference(monkeypatch, device, backend, group_shape, groups, dtype, with_coeffs, mask_dtype):
    if backend == backends.TRITON and device == "cpu" and dtype != torch.float32:
        pytest.skip("the Triton interpreter is checked in fp32 here (and in fp64 by the fp64 tests)")
    use_backend(monkeypatch, device, backend)
    check_against_reference(*make_case(group_shape, groups, dtype, with_coeffs, mask_dtype, device))


@pytest.mark.parametrize("device, backend", backend_cases())
@pytest.mark.parametrize("with_coeffs", [False, True], ids=["identity", "poly"])
@pytest.mark.parametrize("layout", ["transposed", "channels_last", "sliced"])
def test_backend_non_contiguous_input(monkeypatch, device, backend, with_coeffs, layout):
    use_backend(monkeypatch, device, backend)
    x, mask, coeffs, grad = make_case((4, 6, 5, 7), 2, torch.float32, with_coeffs, torch.bool, device, seed=3)
    if layout == "transposed":  # same shape, strides swapped on H and W
        x = x.transpose(2, 3).contiguous().transpose(2, 3)
        mask = mask.transpose(2, 3).contiguous().transpose(2, 3)
        grad = grad.transpose(2, 3).contiguous().transpose(2, 3)
    elif layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
        grad = grad.contiguous(memory_format=torch.channels_last)
    else:  # every other image of a twice-as-long batch
        x = torch.stack([x, x + 1], dim=1).flatten(0, 1)[::2]
    assert not x.is_contiguous()
    check_against_reference(x, mask, coeffs, grad)


@pytest.mark.parametrize("device, backend", backend_cases())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_backend_half_x_with_fp32_coeffs(monkeypatch, device, backend, dtype):
    """A MaskedReLU under autocast: half-precision x, fp32 coeffs; dcoeffs stays fp32."""
    if backend == backends.TRITON and device == "cpu":
        pytest.skip("the Triton interpreter is checked in fp32 and fp64 only")
    use_backend(monkeypatch, device, backend)
    x, mask, coeffs, grad = make_case((2, 6, 5, 5), 3, dtype, True, torch.bool, device, seed=7)
    check_against_reference(x, mask, coeffs.float(), grad)


@pytest.mark.parametrize("device, backend", backend_cases())
@pytest.mark.parametrize("with_coeffs", [False, True], ids=["identity", "poly"])
def test_backend_empty_batch(monkeypatch, device, backend, with_coeffs):
    use_backend(monkeypatch, device, backend)
    x, mask, coeffs, grad = make_case((0, 4, 3, 3), 1, torch.float32, with_coeffs, torch.bool, device)
    check_against_reference(x, mask, coeffs, grad)


# ---- the compiled ops, called directly -------------------------------------------------------------------------

def extension_devices():
    return [pytest.param("cpu", id="cpu"),
            pytest.param("cuda", id="cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
                not extension_has_cuda(), reason="fastmask._C was built without CUDA")])]


@pytest.fixture
def compiled_ops():
    if backends.extension() is None:
        pytest.skip("fastmask._C is not built")
    return torch.ops.fastmask_C


@pytest.mark.parametrize("device", extension_devices())
@pytest.mark.parametrize("group_shape", [(0, 4, 3, 3), (0, 9), (6, 3, 2, 2)], ids=["empty4d", "empty2d", "small"])
@pytest.mark.parametrize("with_coeffs", [False, True], ids=["identity", "poly"])
def test_compiled_ops_direct(compiled_ops, device, group_shape, with_coeffs):
    x, mask, coeffs, grad = make_case(group_shape, 2, torch.float32, with_coeffs, torch.uint8, device)
    grad = grad.t().contiguous().t() if grad.dim() == 2 else grad.transpose(2, 3).contiguous().transpose(2, 3)
    assert not grad.is_contiguous() or grad.numel() == 0  # same values, column-major strides
    out = compiled_ops.masked_act_fwd(x, mask, coeffs)
    dx, dcoeffs = compiled_ops.masked_act_bwd(grad, x, mask, coeffs)
    expected_dx, expected_dcoeffs = reference.masked_act_backward(grad, x, mask, coeffs)
    assert_close(out, reference.masked_act(x, mask, coeffs), torch.float32)
    assert_close(dx, expected_dx, torch.float32)
    assert dcoeffs.dtype == expected_dcoeffs.dtype and dcoeffs.shape == expected_dcoeffs.shape
    assert_sums_close(dcoeffs, expected_dcoeffs, torch.float32, x.numel() // max(x.shape[1], 1))


@pytest.mark.parametrize("device", extension_devices())
@pytest.mark.parametrize("group_shape", [(4, 5, 6, 6), (4, 12)], ids=["4d", "2d"])
def test_compiled_ops_mixed_dtypes(compiled_ops, device, group_shape):
    """bf16 activations with fp32 coeffs (a MaskedReLU under autocast): dcoeffs stays fp32."""
    x, mask, coeffs, grad = make_case(group_shape, 1, torch.bfloat16, True, torch.bool, device)
    coeffs = coeffs.float()
    dx, dcoeffs = compiled_ops.masked_act_bwd(grad, x, mask, coeffs)
    expected_dx, expected_dcoeffs = reference.masked_act_backward(grad, x, mask, coeffs)
    assert dcoeffs.dtype == torch.float32
    assert_close(compiled_ops.masked_act_fwd(x, mask, coeffs), reference.masked_act(x, mask, coeffs), torch.bfloat16)
    assert_close(dx, expected_dx, torch.bfloat16)
    assert_sums_close(dcoeffs, expected_dcoeffs, torch.float32, x.numel() // x.shape[1])


@pytest.mark.parametrize("device", extension_devices())
def test_compiled_ops_large_map_vector_path(compiled_ops, device):
    """A map big enough for the CUDA kernels' vectorized rows and the CPU's parallel split (H*W = 1024)."""
    for dtype in (torch.float32, torch.bfloat16):
        x, mask, coeffs, grad = make_case((4, 8, 32, 32), 2, dtype, True, torch.bool, device, seed=5)
        dx, dcoeffs = compiled_ops.masked_act_bwd(grad, x, mask, coeffs)
        expected_dx, expected_dcoeffs = reference.masked_act_backward(grad, x, mask, coeffs)
        assert_close(compiled_ops.masked_act_fwd(x, mask, coeffs), reference.masked_act(x, mask, coeffs), dtype)
        assert_close(dx, expected_dx, dtype)
        assert_sums_close(dcoeffs, expected_dcoeffs, dtype, x.numel() // x.shape[1])


def test_compiled_ops_reject_bad_input(compiled_ops):
    x = torch.randn(4, 3, 2, 2)
    with pytest.raises(RuntimeError, match="mask shape"):
        compiled_ops.masked_act_fwd(x, torch.ones(1, 3, 2, 3, dtype=torch.bool), None)
    with pytest.raises(RuntimeError, match="not a multiple"):
        compiled_ops.masked_act_fwd(x, torch.ones(3, 3, 2, 2, dtype=torch.bool), None)
    with pytest.raises(RuntimeError, match="coeffs must be"):
        compiled_ops.masked_act_fwd(x, torch.ones(1, 3, 2, 2, dtype=torch.bool), torch.zeros(2, 3))
    with pytest.raises(RuntimeError, match="mask must be bool or uint8"):
        compiled_ops.masked_act_fwd(x, torch.ones(1, 3, 2, 2), None)


# ---- torch.library contracts and gradients -------------------------------------------------------------------

@pytest.mark.parametrize("device, backend", [c for c in backend_cases() if c.values[1] != backends.TRITON])
@pytest.mark.parametrize("with_coeffs", [False, True], ids=["identity", "poly"])
@pytest.mark.parametrize("group_shape, groups", [((3, 4, 5, 3), 2), ((5, 6), 1)], ids=["4d", "2d"])
def test_opcheck(monkeypatch, device, backend, with_coeffs, group_shape, groups):
    use_backend(monkeypatch, device, backend)
    x, mask, coeffs, grad = make_case(group_shape, groups, torch.float32, with_coeffs, torch.bool, device)
    torch.library.opcheck(torch.ops.fastmask.masked_act.default, (x, mask, coeffs))
    torch.library.opcheck(torch.ops.fastmask.masked_act.default,
                          (x.requires_grad_(), mask, None if coeffs is None else coeffs.requires_grad_()))
    torch.library.opcheck(torch.ops.fastmask.masked_act_backward.default, (grad, x.detach(), mask,
                                                                           None if coeffs is None else coeffs.detach()))
    if backend == backends.EXT:  # the compiled ops' own Meta kernels and schemas
        torch.library.opcheck(torch.ops.fastmask_C.masked_act_fwd.default, (x.detach(), mask,
                                                                         None if coeffs is None else coeffs.detach()))
        torch.library.opcheck(torch.ops.fastmask_C.masked_act_bwd.default,
                              (grad, x.detach(), mask, None if coeffs is None else coeffs.detach()))


def away_from_kink(shape, gen):
    """fp64 inputs with |x| >= 0.1, so finite differences never straddle the ReLU's kink at 0."""
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    return x + 0.1 * torch.sign(x)


FP64_CASES = pytest.mark.parametrize("group_shape, groups", [((2, 3, 4, 3), 2), ((3, 5), 3)], ids=["4d", "2d"])


def fp64_case(group_shape, groups, device, seed):
    gen = torch.Generator().manual_seed(seed)
    x = away_from_kink((groups * group_shape[0], *group_shape[1:]), gen).to(device)
    mask = (torch.rand((groups, *group_shape[1:]), generator=gen) > 0.5).to(device)
    coeffs = torch.randn(group_shape[1], 3, generator=gen, dtype=torch.float64).to(device)
    grad = torch.randn(x.shape, generator=gen, dtype=torch.float64).to(device)
    return x, mask, coeffs, grad


def fp64_formula(x, mask, coeffs):
    """masked_act and its gradients written out in fp64, independently of every backend (reference.py included)."""
    groups = mask.shape[0]
    keep = mask.bool().repeat_interleave(x.shape[0] // groups, dim=0)
    c0, c1, c2 = (coeffs[:, k].reshape(-1, *([1] * (x.dim() - 2))) for k in range(3))
    out = torch.where(keep, torch.relu(x), c0 + c1 * x + c2 * x * x)
    slope = torch.where(keep, (x > 0).double(), c1 + 2 * c2 * x)
    return out, slope, keep


@pytest.mark.parametrize("device, backend", backend_cases())
@FP64_CASES
def test_gradcheck_fp64_custom_op(monkeypatch, device, backend, group_shape, groups):
    """Every backend computes fp64 in fp64, so gradcheck passes at its default (fp64) tolerances."""
    use_backend(monkeypatch, device, backend)
    x, mask, coeffs, _ = fp64_case(group_shape, groups, device, seed=1)
    x.requires_grad_()
    coeffs.requires_grad_()
    # The interpreter takes a quarter second a launch: there, check random projections of the Jacobian, not all of it.
    fast = backend == backends.TRITON and device == "cpu"
    assert torch.autograd.gradcheck(lambda a, c: fastmask.masked_relu(a, mask, c), (x, coeffs), fast_mode=fast)
    assert torch.autograd.gradcheck(lambda a: fastmask.masked_relu(a, mask), (x,), fast_mode=fast)


@pytest.mark.parametrize("device, backend", backend_cases())
@FP64_CASES
@pytest.mark.parametrize("with_coeffs", [False, True], ids=["identity", "poly"])
def test_fp64_matches_fp64_formula(monkeypatch, device, backend, group_shape, groups, with_coeffs):
    """fp64 forward and backward agree with the fp64 formula to fp64 rounding (fp32 arithmetic is off by ~1e-7)."""
    use_backend(monkeypatch, device, backend)
    x, mask, coeffs, grad = fp64_case(group_shape, groups, device, seed=8)
    if not with_coeffs:  # the identity is the polynomial 0 + 1*x + 0*x^2
        coeffs = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64, device=device).expand(x.shape[1], 3)
    out, slope, keep = fp64_formula(x, mask, coeffs)
    tight = dict(atol=1e-12, rtol=1e-12)
    used = coeffs if with_coeffs else None
    torch.testing.assert_close(fastmask.masked_relu(x, mask, used), out, **tight)
    dx, dcoeffs = torch.ops.fastmask.masked_act_backward(grad, x, mask, used)
    torch.testing.assert_close(dx, grad * slope, **tight)
    if with_coeffs:
        replaced = torch.where(keep, torch.zeros_like(grad), grad)
        dims = [d for d in range(x.dim()) if d != 1]
        expected = torch.stack([replaced.sum(dims), (replaced * x).sum(dims), (replaced * x * x).sum(dims)], dim=1)
        torch.testing.assert_close(dcoeffs, expected, **tight)


class CompiledMaskedAct(torch.autograd.Function):
    """The compiled forward and backward as one differentiable function, so gradcheck tests the C++/CUDA gradient."""

    @staticmethod
    def forward(ctx, x, mask, coeffs):
        ctx.save_for_backward(x, mask, coeffs)
        return torch.ops.fastmask_C.masked_act_fwd(x, mask, coeffs)

    @staticmethod
    def backward(ctx, grad):
        x, mask, coeffs = ctx.saved_tensors
        dx, dcoeffs = torch.ops.fastmask_C.masked_act_bwd(grad, x, mask, coeffs)
        return dx, None, dcoeffs


@pytest.mark.parametrize("device", extension_devices())
@pytest.mark.parametrize("group_shape, groups", [((2, 3, 6, 7), 2), ((3, 5), 3)], ids=["4d", "2d"])
def test_gradcheck_fp64_compiled_kernels(compiled_ops, device, group_shape, groups):
    gen = torch.Generator().manual_seed(2)
    x = away_from_kink((groups * group_shape[0], *group_shape[1:]), gen).to(device).requires_grad_()
    mask = (torch.rand((groups, *group_shape[1:]), generator=gen) > 0.5).to(device)
    coeffs = torch.randn(group_shape[1], 3, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, c: CompiledMaskedAct.apply(a, mask, c), (x, coeffs))


# ---- the module and the backend report ---------------------------------------------------------------------------

@pytest.mark.parametrize("device, backend", backend_cases())
def test_masked_relu_module(monkeypatch, device, backend):
    use_backend(monkeypatch, device, backend)
    gen = torch.Generator().manual_seed(4)
    module = fastmask.MaskedReLU((3, 4, 5)).to(device)
    module.mask.copy_(torch.rand(3, 4, 5, generator=gen) > 0.3)
    x = torch.randn(6, 3, 4, 5, generator=gen).to(device)
    torch.testing.assert_close(module(x), reference.masked_act(x, module.mask.unsqueeze(0)))
    assert module.relu_count() == int(module.mask.sum())

    # K hypotheses in one stacked batch: slice k uses mask k.
    hypotheses = (torch.rand(3, 3, 4, 5, generator=gen) > 0.5).to(device)
    module.hypotheses = hypotheses
    stacked = module(x.repeat(3, 1, 1, 1))
    module.hypotheses = None
    for k in range(3):
        torch.testing.assert_close(stacked[6 * k:6 * (k + 1)], reference.masked_act(x, hypotheses[k:k + 1]))


@pytest.mark.parametrize("device, backend", backend_cases())
def test_polynomial_module_learns_coeffs(monkeypatch, device, backend):
    use_backend(monkeypatch, device, backend)
    gen = torch.Generator().manual_seed(6)
    module = fastmask.MaskedReLU((4, 3, 3), polynomial=True).to(device)
    module.mask.copy_(torch.rand(4, 3, 3, generator=gen) > 0.5)
    x = torch.randn(5, 4, 3, 3, generator=gen).to(device)
    # A fresh polynomial site is the identity, so it equals plain linearization.
    torch.testing.assert_close(module(x), reference.masked_act(x, module.mask.unsqueeze(0)))
    grad = torch.randn(x.shape, generator=gen).to(device)
    module(x).backward(grad)
    _, expected = reference.masked_act_backward(grad, x, module.mask.unsqueeze(0), module.coeffs.detach())
    assert_sums_close(module.coeffs.grad, expected, torch.float32, x.numel() // 4)


def test_backend_reports_extension(monkeypatch):
    monkeypatch.delenv("FASTMASK_BACKEND", raising=False)
    report = fastmask.backend()
    if os.environ.get("FASTMASK_BUILD_EXT", "").strip() == "0":
        assert report["extension"].startswith("not loaded")
        assert report["masked_act"]["cpu"] == backends.TORCH
    else:  # a build that silently lost the extension must fail here, not fall back unnoticed
        assert report["extension"].startswith("loaded"), report["extension"]
        assert report["masked_act"]["cpu"] == backends.EXT
        if torch.cuda.is_available() and extension_has_cuda():
            assert report["masked_act"]["cuda"] == backends.EXT
