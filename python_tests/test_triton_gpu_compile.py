"""The Triton kernels compile for the GPU (sm_80 and sm_90), checked without one: fastmask.ops.triton.aot runs the
real launchers on CPU tensors and compiles what they would launch, in a process without TRITON_INTERPRET (the
interpreter accepts code that the GPU compiler rejects: tl.dot dims under 16, some casts). The PTX is then checked for
what the kernels' speed rests on: 16-byte loads in the streaming kernel, tensor-core MMAs in the conv, no spills in
the masked activation.
"""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

# Shared memory one block may use (cudaDevAttrMaxSharedMemoryPerBlockOptin): A100 and H100.
SHARED_MEMORY_LIMIT = {80: 166_912, 90: 232_448}


def _compile(*args: str) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "fastmask.ops.triton.aot", "--json", *args], env=env,
                          capture_output=True, text=True, timeout=900)
    if done.returncode != 0 and "AotUnavailable" in done.stderr:
        pytest.skip(done.stderr.strip().splitlines()[-1])
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout)


@pytest.fixture(scope="module", params=[80, 90], ids=["sm80", "sm90"])
def masked_act_kernels(request):
    return _compile("--arch", str(request.param), "--kernel", "masked_act")


@pytest.fixture(scope="module")
def conv_kernels_sm90():
    return _compile("--arch", "90", "--kernel", "conv_bn_act", "--first-config")


@pytest.fixture(scope="module")
def conv_kernels_sm80():
    return _compile("--arch", "80", "--kernel", "conv_bn_act", "--first-config", "--dtypes", "bf16")


def test_masked_act_compiles_every_variant_without_spills(masked_act_kernels):
    # 3 dtypes x 3 shapes x (identity, coeffs) x (forward, backward)
    assert len(masked_act_kernels) == 36
    for row in masked_act_kernels:
        assert row["stack_bytes"] == 0 and row["local_bytes"] == 0, row
        assert 0 < row["registers"] <= 128, row


def test_masked_act_streams_with_16_byte_loads(masked_act_kernels):
    # a contiguous [.., 32, 32] map: x (and grad) must load 16 bytes a lane, or the kernel cannot reach HBM speed
    for row in masked_act_kernels:
        if "conv map" in row["variant"]:
            assert row["wide_global_loads"] >= 2, row


def test_conv_bn_act_compiles_every_layer_kind_and_dtype(conv_kernels_sm90):
    # 3 dtypes x 4 layer kinds (packed-K stem, 3x3 + residual, 3x3 stride 2, 1x1 shortcut)
    assert len(conv_kernels_sm90) == 12
    assert {row["variant"].split()[0] for row in conv_kernels_sm90} == {"fp32", "fp16", "bf16"}


def test_first_conv_config_fits_shared_memory(conv_kernels_sm90, conv_kernels_sm80):
    # The first config is what FASTMASK_TRITON_AUTOTUNE=0 launches: it must load on both GPUs (the tuner skips others)
    for row in conv_kernels_sm90 + conv_kernels_sm80:
        assert row["shared_bytes"] <= SHARED_MEMORY_LIMIT[row["arch"]], row


def test_conv_bn_act_uses_tensor_cores(conv_kernels_sm90, conv_kernels_sm80):
    for row in conv_kernels_sm90:
        if not row["variant"].startswith("fp32"):  # fp32 here is the ieee variant (CPU tensors), FMA by design
            assert row["wgmma"] > 0, row  # Hopper's warpgroup MMA, not the older mma.sync
    assert len(conv_kernels_sm80) == 4
    for row in conv_kernels_sm80:
        assert row["tensor_core_instructions"] > 0 and row["wgmma"] == 0, row
