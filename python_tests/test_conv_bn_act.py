"""fastmask.ops.conv_bn_act (Triton implicit-GEMM conv + BN + residual + masked activation) against the reference.

On the GPU the compiled kernel runs in fp32 (ieee and tf32), fp16 and bf16 on ResNet-like shapes; on the CPU the same
op runs its Triton kernel under TRITON_INTERPRET=1 (python_tests/conftest.py sets it before collection when there is
no GPU) with FASTMASK_BACKEND=triton, in fp32 on tiny shapes.
"""
import subprocess
import sys

import pytest
import torch

from fastmask.errors import FastmaskError
from fastmask.ops import backends, conv_bn_act, reference  # conv_bn_act: the public function

triton_conv = pytest.importorskip("fastmask.ops.triton.conv_bn_act")
HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
pytestmark = pytest.mark.skipif(not backends.triton_supports(DEVICE),
                                reason="Triton on the CPU needs TRITON_INTERPRET=1 before the kernel is imported")
cuda = pytest.mark.cuda
CPU_TOL = (1e-4, 1e-4)  # fp32 with ieee dots, only the summation order differs


@pytest.fixture(autouse=True)
def triton_backend(monkeypatch):
    """Every test here runs the Triton kernel, never a silent fallback to the reference; fp32 as ieee on the GPU
    too (tf32 would round the kernel and the cuDNN reference differently), unless a test asks for tf32. One launch
    config: autotuning every variant on the GPU would compile hundreds of kernels (test_every_config_gpu and
    test_autotuned_launch_gpu cover the others and the tuner)."""
    monkeypatch.setenv("FASTMASK_BACKEND", "triton")
    monkeypatch.setenv("FASTMASK_TRITON_AUTOTUNE", "0")
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    assert backends.select(DEVICE, has_ext_kernel=False) == backends.TRITON


def _make(groups, per_group, c_in, c_out, size, ksize, stride, padding, with_mask, with_residual,
          with_coeffs=False, dtype=torch.float32, seed=0):
    """Random inputs on DEVICE; weights scaled so outputs are O(1) (both signs, so masks matter)."""
    gen = torch.Generator().manual_seed(seed)
    height, width = size
    x = torch.randn(groups * per_group, c_in, height, width, generator=gen)
    weight = torch.randn(c_out, c_in, ksize, ksize, generator=gen) / (c_in * ksize * ksize) ** 0.5
    scale = torch.rand(c_out, generator=gen) + 0.5
    shift = torch.randn(c_out, generator=gen) * 0.5
    oh = (height + 2 * padding - ksize) // stride + 1
    ow = (width + 2 * padding - ksize) // stride + 1
    mask = torch.rand(groups, c_out, oh, ow, generator=gen) < 0.5 if with_mask else None
    residual = torch.randn(groups * per_group, c_out, oh, ow, generator=gen) if with_residual else None
    coeffs = torch.randn(c_out, 3, generator=gen) * 0.3 if with_coeffs else None

    def move(t, cast=True):
        return None if t is None else t.to(DEVICE, dtype if cast and t.is_floating_point() else t.dtype)

    return dict(x=move(x), weight=move(weight), scale=move(scale, False), shift=move(shift, False), mask=move(mask),
                residual=move(residual), coeffs=move(coeffs, False), stride=stride, padding=padding)


def _check(args, atol, rtol):
    out = conv_bn_act(**args)
    expected = reference.conv_bn_act(**args)
    assert out.dtype == args["x"].dtype and out.shape == expected.shape
    torch.testing.assert_close(out, expected, atol=atol, rtol=rtol)
    return out


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("with_mask", [False, True], ids=["no-act", "masked"])
@pytest.mark.parametrize("with_residual", [False, True], ids=["no-res", "res"])
@pytest.mark.parametrize("ksize,padding", [(1, 0), (3, 1)], ids=["1x1", "3x3"])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("c_in", [3, 16])
def test_matches_reference_cpu_sized(c_in, stride, ksize, padding, with_residual, with_mask, groups):
    """Stride, kernel, residual, mask and groups on tiny non-square images (H != W catches swapped axes)."""
    args = _make(groups, 4 // groups, c_in, 16, (7, 6), ksize, stride, padding, with_mask, with_residual)
    _check(args, *CPU_TOL)


def test_unpadded_3x3_and_odd_channel_counts():
    _check(_make(1, 2, 5, 20, (6, 7), 3, 1, 0, True, True), *CPU_TOL)


def test_polynomial_replacement_uses_coeffs():
    args = _make(2, 1, 16, 16, (5, 5), 3, 1, 1, True, True, with_coeffs=True)
    out = _check(args, *CPU_TOL)
    identity = conv_bn_act(**{**args, "coeffs": None})
    assert not torch.allclose(out, identity)  # the coeffs changed the removed positions


def test_each_image_uses_the_mask_of_its_group():
    """G=2, N=2: mask 0 keeps every ReLU, mask 1 removes them all. Reading mask n (or n % G) instead of n // N puts a
    ReLU on image 1 or none on image 2."""
    args = _make(2, 2, 16, 16, (4, 4), 3, 1, 1, True, False)
    args["mask"] = torch.stack([torch.ones_like(args["mask"][0]), torch.zeros_like(args["mask"][0])])
    out = conv_bn_act(**args)
    pre_activation = reference.conv_bn_act(**{**args, "mask": None})
    assert (pre_activation < 0).any()
    torch.testing.assert_close(out[:2], torch.relu(pre_activation[:2]), atol=CPU_TOL[0], rtol=CPU_TOL[1])
    torch.testing.assert_close(out[2:], pre_activation[2:], atol=CPU_TOL[0], rtol=CPU_TOL[1])


def test_residual_is_added_per_image_and_position():
    """A random residual (not zeros, not one value repeated) must be added at its own (n, c, h, w)."""
    args = _make(2, 2, 16, 16, (4, 5), 3, 1, 1, False, True)
    out = _check(args, *CPU_TOL)
    without = conv_bn_act(**{**args, "residual": None})
    torch.testing.assert_close(out - without, args["residual"], atol=CPU_TOL[0], rtol=CPU_TOL[1])


def test_scale_and_shift_are_per_output_channel():
    """With an identity 1x1 conv the op is x * scale[c] + shift[c]: scale/shift broadcast along H or W would fail
    (C = 16, H = 4, W = 5 are all different)."""
    c = 16
    x = torch.randn(2, c, 4, 5, device=DEVICE)
    weight = torch.eye(c, device=DEVICE).reshape(c, c, 1, 1)
    scale = torch.arange(1, c + 1, device=DEVICE, dtype=torch.float32)
    shift = -torch.arange(c, device=DEVICE, dtype=torch.float32) / 4
    out = conv_bn_act(x, weight, scale, shift, padding=0)
    torch.testing.assert_close(out, x * scale.view(1, c, 1, 1) + shift.view(1, c, 1, 1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_output_keeps_the_input_memory_format(layout):
    args = _make(1, 2, 16, 16, (4, 4), 3, 2, 1, True, True)
    if layout == "channels_last":
        args["x"] = args["x"].contiguous(memory_format=torch.channels_last)
        args["residual"] = args["residual"].contiguous(memory_format=torch.channels_last)
    out = _check(args, *CPU_TOL)
    expected_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    assert out.is_contiguous(memory_format=expected_format)


def test_uint8_mask_and_three_dim_mask():
    args = _make(1, 2, 16, 16, (4, 4), 3, 1, 1, True, False)
    expected = reference.conv_bn_act(**args)
    torch.testing.assert_close(conv_bn_act(**{**args, "mask": args["mask"].to(torch.uint8) * 3}), expected,
                               atol=CPU_TOL[0], rtol=CPU_TOL[1])
    torch.testing.assert_close(conv_bn_act(**{**args, "mask": args["mask"][0]}), expected,
                               atol=CPU_TOL[0], rtol=CPU_TOL[1])


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_opcheck(monkeypatch, backend):
    """Schema, fake impl (shape and strides), and torch.compile tracing, for the Triton and the reference body."""
    monkeypatch.setenv("FASTMASK_BACKEND", backend)
    args = _make(2, 1, 3, 16, (4, 4), 3, 2, 1, True, True, with_coeffs=True)
    order = ["x", "weight", "scale", "shift", "mask", "residual", "coeffs", "stride", "padding"]
    torch.library.opcheck(torch.ops.fastmask.conv_bn_act.default, tuple(args[k] for k in order))
    cl = dict(args, x=args["x"].contiguous(memory_format=torch.channels_last), mask=None, coeffs=None)
    torch.library.opcheck(torch.ops.fastmask.conv_bn_act.default, tuple(cl[k] for k in order))


def test_refuses_grad_and_bad_shapes():
    args = _make(2, 1, 16, 16, (4, 4), 3, 1, 1, True, False)
    with pytest.raises(FastmaskError, match="inference only"):
        conv_bn_act(**{**args, "weight": args["weight"].clone().requires_grad_()})
    with torch.no_grad():  # the same call is fine without grad mode
        conv_bn_act(**{**args, "weight": args["weight"].clone().requires_grad_()})
    with pytest.raises(FastmaskError, match="mask must be"):
        conv_bn_act(**{**args, "mask": args["mask"][:, :, :2]})
    with pytest.raises(FastmaskError, match="multiple of the 3 mask groups"):
        conv_bn_act(**{**args, "mask": args["mask"][:1].repeat(3, 1, 1, 1)})
    with pytest.raises(FastmaskError, match="scale must be"):
        conv_bn_act(**{**args, "scale": args["scale"][:4]})


# GPU: ResNet18 CIFAR-like layers (fewer images), every dtype; fp32 both as ieee and as tf32 (torch's default).
GPU_LAYERS = [  # (c_in, c_out, size, ksize, stride, padding)
    (3, 64, 32, 3, 1, 1),      # stem (packed K)
    (64, 64, 32, 3, 1, 1),
    (64, 128, 32, 3, 2, 1),    # stage transition
    (64, 128, 32, 1, 2, 0),    # its 1x1 shortcut
    (128, 128, 16, 3, 1, 1),
    (256, 512, 8, 3, 2, 1),
    (96, 100, 9, 3, 1, 1),     # channel counts off the block sizes
]
GPU_DTYPES = [("fp32-ieee", torch.float32, 1e-4, 1e-4), ("fp32-tf32", torch.float32, 3e-2, 3e-2),
              ("fp16", torch.float16, 1e-2, 1e-2), ("bf16", torch.bfloat16, 5e-2, 3e-2)]


def _gpu_args(layer, dtype, channels_last, with_coeffs):
    c_in, c_out, size, ksize, stride, padding = layer
    args = _make(3, 4, c_in, c_out, (size, size), ksize, stride, padding, True, True, with_coeffs, dtype)
    if channels_last:
        args["x"] = args["x"].contiguous(memory_format=torch.channels_last)
        args["residual"] = args["residual"].contiguous(memory_format=torch.channels_last)
    return args


@cuda
@pytest.mark.parametrize("name,dtype,atol,rtol", GPU_DTYPES, ids=[d[0] for d in GPU_DTYPES])
@pytest.mark.parametrize("layer", GPU_LAYERS, ids=[str(layer) for layer in GPU_LAYERS])
def test_matches_reference_gpu(monkeypatch, layer, name, dtype, atol, rtol):
    """channels_last inputs (the fast layout), 3 mask groups, residual; coeffs in the fp16 runs."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", name == "fp32-tf32")
    _check(_gpu_args(layer, dtype, True, with_coeffs=name == "fp16"), atol, rtol)


@cuda
@pytest.mark.parametrize("layer", GPU_LAYERS[:4], ids=[str(layer) for layer in GPU_LAYERS[:4]])
def test_nchw_inputs_gpu(layer):
    out = _check(_gpu_args(layer, torch.bfloat16, False, with_coeffs=False), 5e-2, 3e-2)
    assert out.is_contiguous()


@cuda
@pytest.mark.parametrize("layer", [GPU_LAYERS[1], GPU_LAYERS[3]], ids=["3x3", "1x1-s2"])
def test_every_config_gpu(layer):
    """Each autotune config on its own (the tuner would only ever run the fastest)."""
    args = _gpu_args(layer, torch.bfloat16, True, with_coeffs=False)
    expected = reference.conv_bn_act(**args)
    for config in triton_conv.configs(pointwise=layer[3] == 1):
        out = torch.empty_like(expected)
        triton_conv.conv_bn_act(**args, out=out, config=config)
        torch.testing.assert_close(out, expected, atol=5e-2, rtol=3e-2, msg=lambda m, c=config: f"{c}: {m}")


@cuda
def test_autotuned_launch_gpu(monkeypatch):
    monkeypatch.setenv("FASTMASK_TRITON_AUTOTUNE", "1")
    _check(_gpu_args(GPU_LAYERS[4], torch.bfloat16, True, with_coeffs=True), 5e-2, 3e-2)


def test_tf32_setting_is_read_from_the_legacy_flag_and_from_fp32_precision():
    # A process of its own: once fp32_precision is set, torch raises on every later read of the legacy flag.
    code = ("import torch\n"
            "from fastmask.ops.triton.conv_bn_act import cudnn_conv_allows_tf32 as allows\n"
            "torch.backends.cudnn.allow_tf32 = False; seen = [allows()]\n"
            "torch.backends.cudnn.allow_tf32 = True; seen.append(allows())\n"
            "torch.backends.cudnn.conv.fp32_precision = 'ieee'; seen.append(allows())\n"
            "torch.backends.cudnn.conv.fp32_precision = 'tf32'; seen.append(allows())\n"
            "print(seen)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[False, True, False, True]"


def test_tuned_configs_are_reused_across_row_counts_within_a_power_of_two(monkeypatch):
    # Scoring's chunk size moves the row count from call to call; retuning each would cost seconds on the GPU.
    monkeypatch.setenv("FASTMASK_TRITON_AUTOTUNE", "1")
    monkeypatch.setattr(triton_conv, "_best", {})
    for per_group in (3, 4):  # 48 and 64 rows: one bucket
        _check(_make(1, per_group, 16, 16, (4, 4), 3, 1, 1, True, False), *CPU_TOL)
    assert len(triton_conv._best) == 1
    _check(_make(1, 5, 16, 16, (4, 4), 3, 1, 1, True, False), *CPU_TOL)  # 80 rows: the next bucket
    assert len(triton_conv._best) == 2
