"""The build: setup.py finds the CUDA toolkit behind nvcc wrappers and symlinks, and the extension has the parts
the build environment asked for."""
from __future__ import annotations

import importlib.util
import os
import stat
from pathlib import Path

import pytest
import torch

from fastmask.ops import backends

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup_py():
    spec = importlib.util.spec_from_file_location("fastmask_setup_py", REPO / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # setup() itself only runs under __main__
    return module


def executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


@pytest.fixture
def fake_toolkit(tmp_path):
    """A toolkit folder whose bin/nvcc answers a dry run the way the real one does ("#$ TOP=<bin>/..")."""
    root = tmp_path / "cuda-99.0"
    (root / "include").mkdir(parents=True)
    (root / "include" / "cuda_runtime.h").write_text("")
    (root / "bin").mkdir()
    executable(root / "bin" / "nvcc", f'#!/bin/sh\necho "#$ _HERE_={root}/bin"\necho "#$ TOP={root}/bin/.."\n')
    return root


def test_toolkit_behind_wrapper_script(setup_py, fake_toolkit, tmp_path):
    wrapper = executable(tmp_path / "nvcc", f'#!/bin/sh\nexec {fake_toolkit}/bin/nvcc "$@"\n')
    assert setup_py.toolkit_from_nvcc(str(wrapper)) == os.path.realpath(fake_toolkit)


def test_toolkit_behind_symlink(setup_py, fake_toolkit, tmp_path):
    link = tmp_path / "links" / "nvcc"
    link.parent.mkdir()
    link.symlink_to(fake_toolkit / "bin" / "nvcc")
    assert setup_py.toolkit_from_nvcc(str(link)) == os.path.realpath(fake_toolkit)


def test_no_toolkit_behind_silent_wrapper(setup_py, tmp_path):
    wrapper = executable(tmp_path / "nvcc", "#!/bin/sh\nexit 1\n")
    assert setup_py.toolkit_from_nvcc(str(wrapper)) is None


def test_cuda_home_env_wins_when_it_is_a_toolkit(setup_py, fake_toolkit, tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_HOME", str(fake_toolkit))
    silent = executable(tmp_path / "nvcc", "#!/bin/sh\nexit 1\n")
    assert setup_py.resolve_cuda_home(str(silent)) == os.path.realpath(fake_toolkit)
    assert setup_py.find_nvcc() == str(fake_toolkit / "bin" / "nvcc")


@pytest.fixture(scope="module")
def cuda_from_pypi():
    spec = importlib.util.spec_from_file_location("fastmask_cuda_from_pypi", REPO / ".ci" / "cuda_from_pypi.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_wheel_toolkit_gets_the_names_builds_look_for(cuda_from_pypi, tmp_path):
    """NVIDIA's wheels ship lib/libcudart.so.13 and no lib64/: linking -lcudart from lib64/ needs both added."""
    root = tmp_path / "cu13"
    (root / "lib").mkdir(parents=True)
    (root / "lib" / "libcudart.so.13").write_text("")
    (root / "bin").mkdir()
    executable(root / "bin" / "nvcc", "#!/bin/sh\necho 'Cuda compilation tools, release 13.0'\n")
    cuda_from_pypi.lay_out(str(root))
    cuda_from_pypi.lay_out(str(root))  # a second run over a laid-out folder changes nothing
    assert (root / "lib64" / "libcudart.so").resolve() == (root / "lib" / "libcudart.so.13").resolve()


def test_wheel_toolkit_whose_nvcc_cannot_run_is_refused(cuda_from_pypi, tmp_path):
    root = tmp_path / "cu13"
    (root / "lib").mkdir(parents=True)
    (root / "bin").mkdir()
    executable(root / "bin" / "nvcc", "#!/bin/sh\necho 'cannot execute binary file' >&2\nexit 126\n")
    with pytest.raises(cuda_from_pypi.Unavailable, match="does not run here"):
        cuda_from_pypi.lay_out(str(root))


def test_extension_has_the_parts_the_build_asked_for():
    """CI exports FASTMASK_BUILD_CUDA for the build and the tests: 1 when it found or installed a CUDA toolkit (the
    CUDA kernels must then be compiled in), 0 when it built the CPU kernels only."""
    wanted = os.environ.get("FASTMASK_BUILD_CUDA", "").strip()
    if os.environ.get("FASTMASK_BUILD_EXT", "").strip() == "0":
        assert backends.extension() is None
        return
    ext = backends.extension()
    assert ext is not None, backends.extension_status()
    if wanted == "1":
        assert ext.built_with_cuda()
    elif wanted == "0":
        assert not ext.built_with_cuda()
    assert hasattr(torch.ops.fastmask_C, "masked_act_fwd") and hasattr(torch.ops.fastmask_C, "masked_act_bwd")


@pytest.mark.cuda
def test_gpu_machine_gets_cuda_kernels():
    if os.environ.get("FASTMASK_BUILD_CUDA", "").strip() == "0":
        pytest.skip("FASTMASK_BUILD_CUDA=0: built without CUDA on purpose")
    ext = backends.extension()
    assert ext is not None and ext.built_with_cuda(), "rebuild on this machine with nvcc on PATH"
    assert backends.select("cuda") == backends.EXT or os.environ.get("FASTMASK_BACKEND")


def _cuobjdump() -> str | None:
    """NVIDIA's cuobjdump: the toolkit's, else the one Triton bundles."""
    import shutil

    found = shutil.which("cuobjdump")
    if found:
        return found
    try:
        from triton import knobs

        return knobs.nvidia.cuobjdump.path
    except Exception:  # no Triton, or one without the NVIDIA backend
        return None


def test_cuda_kernels_use_16_byte_accesses_and_never_spill():
    """What the CUDA kernels' speed rests on, read from the compiled SASS without a GPU: every kernel for every
    architecture uses no local memory (no register spills), and every vectorized elementwise kernel (kVec > 1) moves
    x and out with 128-bit LDG/STG."""
    import re
    import subprocess

    ext = backends.extension()
    if ext is None or not ext.built_with_cuda():
        pytest.skip("the extension was built without its CUDA kernels")
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump (CUDA toolkit or Triton) to read the kernels with")
    usage = subprocess.run([tool, "--dump-resource-usage", ext.__file__], capture_output=True, text=True,
                           check=True).stdout
    kernels = re.findall(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", usage)
    assert kernels, usage[:2000]
    for name, _registers, stack, local in kernels:
        assert int(stack) == 0 and int(local) == 0, f"{name} spills: STACK {stack}, LOCAL {local}"

    sass = subprocess.run([tool, "-sass", ext.__file__], capture_output=True, text=True, check=True).stdout
    architectures = set(re.findall(r"arch = (sm_\d+)", sass))
    assert architectures, sass[:2000]
    vectorized = 0
    for body in re.split(r"\n\s*Function : ", sass)[1:]:
        name = body.split("\n", 1)[0]
        width = re.search(r"masked_elementwise_kernel.*?Li(\d+)E", name)
        if width and int(width.group(1)) > 1:
            vectorized += 1
            assert "LDG.E.128" in body and "STG.E.128" in body, f"{name} does not move 16 bytes a lane"
    assert vectorized >= 16 * len(architectures), "fp32/fp16/bf16/fp64 x 2 index types x (identity, coeffs), per arch"
