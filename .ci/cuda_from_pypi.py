"""A CUDA toolkit from NVIDIA's wheels on the package index, for a machine without one: installs the CUDA compiler
that matches the installed torch into .cuda-pypi/ (ignored by git, reused by later runs) and prints the toolkit
folder, for CUDA_HOME. When it cannot, it exits 1 with the reason in one line on stderr.

Usage: python .ci/cuda_from_pypi.py
"""
from __future__ import annotations

import glob
import importlib.metadata
import os
import shutil
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = os.path.join(REPO, ".cuda-pypi")
EXTRAS = "nvcc,cccl"  # nvcc brings crt, nvvm and the runtime's headers; cccl holds thrust/cub/libcu++


class Unavailable(Exception):
    pass


def requirement() -> str:
    """The `cuda-toolkit` metapackage (NVIDIA's pins for each CUDA release) at the release torch was built with."""
    import torch

    if torch.version.cuda is None:
        raise Unavailable(f"torch {torch.__version__} is CPU-only")
    try:  # a CUDA build of torch from PyPI depends on cuda-toolkit itself: take exactly its version
        return f"cuda-toolkit[{EXTRAS}]=={importlib.metadata.version('cuda-toolkit')}"
    except importlib.metadata.PackageNotFoundError:
        return f"cuda-toolkit[{EXTRAS}]=={torch.version.cuda}.*"


def toolkit_root() -> str | None:
    # CUDA 13's wheels share one folder (nvidia/cu13/); earlier releases split each package into its own folder.
    roots = [os.path.dirname(os.path.dirname(nvcc)) for nvcc in glob.glob(os.path.join(TARGET, "nvidia", "*", "bin",
                                                                                         "nvcc"))]
    return next((r for r in roots if os.path.isfile(os.path.join(r, "include", "cuda_runtime.h"))), None)


def symlink(link: str, to: str) -> None:
    if not os.path.lexists(link):
        os.makedirs(os.path.dirname(link), exist_ok=True)
        os.symlink(to, link)


def lay_out(root: str) -> None:
    """What the wheels leave out of a toolkit folder: nvcc and torch look for the libraries in lib64/, and the
    linker wants the unversioned lib*.so names."""
    symlink(os.path.join(root, "lib64"), "lib")
    for versioned in glob.glob(os.path.join(root, "lib", "lib*.so.*")):
        name = os.path.basename(versioned)
        symlink(os.path.join(root, "lib", name.split(".so.")[0] + ".so"), name)
    nvcc = os.path.join(root, "bin", "nvcc")
    try:
        version = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as error:
        raise Unavailable(f"{nvcc} does not run here: {error}") from None
    if version.returncode != 0:
        raise Unavailable(f"{nvcc} does not run here: {(version.stderr or version.stdout).strip()[-200:]}")


def install(spec: str) -> str:
    stamp = os.path.join(TARGET, "requirement.txt")
    root = toolkit_root()
    if root and os.path.isfile(stamp) and open(stamp).read().strip() == spec:
        return root
    shutil.rmtree(TARGET, ignore_errors=True)
    print(f"installing {spec} into {os.path.relpath(TARGET, REPO)}/", file=sys.stderr)
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                          "--target", TARGET, spec], capture_output=True, text=True)
    if pip.returncode != 0:
        errors = [line for line in pip.stderr.splitlines() if line.startswith("ERROR")] or pip.stderr.splitlines()
        raise Unavailable(f"pip could not install {spec}: {errors[-1] if errors else 'exit ' + str(pip.returncode)}")
    root = toolkit_root()
    if root is None:
        raise Unavailable(f"{spec} has no folder holding both bin/nvcc and include/cuda_runtime.h")
    lay_out(root)
    with open(stamp, "w") as f:
        f.write(spec + "\n")
    return root


def main() -> int:
    try:
        print(install(requirement()))
    except Unavailable as why:
        print(why, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
