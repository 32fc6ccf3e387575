"""Builds fastmask._C (the C++ CPU kernels, plus the CUDA kernels when nvcc is found) from csrc/.

Project metadata lives in pyproject.toml; this file only adds the extension. Install with the torch you run:
    pip install --no-build-isolation -e .
Environment:
    FASTMASK_BUILD_EXT=0    no extension at all (fastmask then runs on its PyTorch reference and says so)
    FASTMASK_BUILD_CUDA=0   C++ CPU kernels only; =1 requires the CUDA part (fails when nvcc is missing); unset: auto
    CUDA_HOME               the CUDA toolkit folder (the one holding include/cuda_runtime.h); found from nvcc if unset
    TORCH_CUDA_ARCH_LIST    GPU architectures; defaults to "8.0;9.0" when no GPU is visible
    MAX_JOBS                parallel compile jobs (ninja is used when installed)
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCH_LIST = "8.0;9.0"


def flag(name: str) -> str | None:
    """'1', '0', or None (unset) for a boolean environment variable."""
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return None
    return "0" if value in ("0", "false", "no", "off") else "1"


def is_toolkit(root: str | None) -> bool:
    return bool(root) and os.path.isfile(os.path.join(root, "include", "cuda_runtime.h"))


def toolkit_from_nvcc(nvcc: str) -> str | None:
    """The toolkit folder behind an nvcc, which may be a symlink or a wrapper script that execs the real one."""
    root = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    if is_toolkit(root):
        return root
    # A wrapper script: the real nvcc reports its own location in a dry run ("#$ TOP=/usr/local/cuda-13.0/bin/..").
    try:
        dry_run = subprocess.run([nvcc, "--dryrun", "-v", "probe.cu"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        dry_run = None
    if dry_run is not None:
        for line in (dry_run.stdout + dry_run.stderr).splitlines():
            match = re.match(r"#\$ TOP=(.+)$", line.strip())
            if match:
                root = os.path.realpath(match.group(1).strip())
                if is_toolkit(root):
                    return root
    return None


def find_nvcc() -> str | None:
    for home_var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(home_var)
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def resolve_cuda_home(nvcc: str) -> str | None:
    """CUDA_HOME when it is a real toolkit, else the toolkit behind nvcc, else a standard install location."""
    for home_var in ("CUDA_HOME", "CUDA_PATH"):
        if is_toolkit(os.environ.get(home_var)):
            return os.path.realpath(os.environ[home_var])
    root = toolkit_from_nvcc(nvcc)
    if root:
        return root
    candidates = ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    return next((os.path.realpath(c) for c in candidates if is_toolkit(c)), None)


def cuda_plan() -> str | None:
    """The CUDA toolkit to build the CUDA kernels with, or None for a CPU-only extension."""
    wanted = flag("FASTMASK_BUILD_CUDA")
    if wanted == "0":
        return None
    nvcc = find_nvcc()
    if nvcc is None:
        if wanted == "1":
            sys.exit("FASTMASK_BUILD_CUDA=1 but nvcc was not found: put the CUDA toolkit's bin/ on PATH or set "
                     "CUDA_HOME")
        print("fastmask: nvcc not found, building the C++ CPU kernels only", file=sys.stderr)
        return None
    import torch

    if torch.version.cuda is None:
        if wanted == "1":
            sys.exit("FASTMASK_BUILD_CUDA=1 but the installed torch has no CUDA support: install a CUDA build of torch")
        print("fastmask: this torch is CPU-only, building the C++ CPU kernels only", file=sys.stderr)
        return None
    home = resolve_cuda_home(nvcc)
    if home is None:
        sys.exit(f"fastmask: found {nvcc} but no CUDA toolkit folder with include/cuda_runtime.h behind it: "
                 "set CUDA_HOME to the toolkit folder, or FASTMASK_BUILD_CUDA=0 to build without CUDA")
    return home


def extension_modules(cuda_home: str | None):
    if cuda_home is not None:
        # torch.utils.cpp_extension reads CUDA_HOME once, when it is first imported.
        os.environ["CUDA_HOME"] = cuda_home
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            import torch

            if not torch.cuda.is_available():  # torch would otherwise look for a GPU to pick the arch from
                os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_LIST
    from torch.utils import cpp_extension

    sources = sorted(glob.glob("csrc/*.cpp", root_dir=HERE))
    cxx_flags = ["-O3", "-g0", "-fopenmp"]  # -g0: no debug info; OpenMP: at::parallel_for only runs threads then
    link_flags = ["-fopenmp"]
    if cuda_home is None:
        return [cpp_extension.CppExtension("fastmask._C", sources, extra_compile_args={"cxx": cxx_flags},
                                           extra_link_args=link_flags)], cpp_extension
    sources += sorted(glob.glob("csrc/*.cu", root_dir=HERE))
    define = ["-DFASTMASK_WITH_CUDA"]
    print(f"fastmask: building CUDA kernels with CUDA_HOME={cuda_home}, "
          f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', '(visible GPU)')}", file=sys.stderr)
    return [cpp_extension.CUDAExtension("fastmask._C", sources,
                                        extra_compile_args={"cxx": cxx_flags + define, "nvcc": ["-O3"] + define},
                                        extra_link_args=link_flags)], cpp_extension


def main():
    if flag("FASTMASK_BUILD_EXT") == "0":
        print("fastmask: FASTMASK_BUILD_EXT=0, installing without the compiled extension", file=sys.stderr)
        setup()
        return
    modules, cpp_extension = extension_modules(cuda_plan())
    setup(ext_modules=modules, cmdclass={"build_ext": cpp_extension.BuildExtension})


if __name__ == "__main__":
    main()
