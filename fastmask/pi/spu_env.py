"""The separate Python environment that SecretFlow SPU runs in.

SPU 0.9.5 pins Python < 3.12, numpy < 2 and jax <= 0.4.34 (about 1 GB installed), which do not fit fastmask's own
environment, so it lives in a virtual environment of its own and fastmask talks to it through files and subprocesses
(fastmask.pi.spu_runtime). Where it is:
- FASTMASK_SPU_PYTHON, when set: the python of an environment that has spu, jax, numpy and onnx;
- else <cache>/fastmask/spu-venv/bin/python, <cache> being $XDG_CACHE_HOME or ~/.cache.

One-time setup (creates that default environment with a Python 3.10 or 3.11 interpreter: this one when it qualifies,
else FASTMASK_SPU_BASE_PYTHON, else python3.11 or python3.10 on PATH):

    python -m fastmask.pi.spu_env --install        # or: fastmask-pi --install-runtime spu
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

from ..errors import FastmaskError

ENV_VAR = "FASTMASK_SPU_PYTHON"
BASE_ENV_VAR = "FASTMASK_SPU_BASE_PYTHON"
REQUIREMENTS = ("spu==0.9.5", "onnx>=1.16,<2")  # spu brings its own pins: numpy<2, jax/jaxlib 0.4.34
INSTALL_COMMAND = "python -m fastmask.pi.spu_env --install"
PARTY_SCRIPT = Path(__file__).resolve().with_name("spu_party.py")


def default_venv() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "fastmask" / "spu-venv"


def _venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def candidate() -> Path:
    """The python that should run SPU: FASTMASK_SPU_PYTHON, else the default environment's."""
    override = os.environ.get(ENV_VAR)
    return Path(override) if override else _venv_python(default_venv())


@functools.lru_cache(maxsize=None)
def _probe(python: str) -> tuple[Optional[dict], str]:
    """(versions, "") when `python` imports spu, jax, numpy and onnx; else (None, why not)."""
    if not Path(python).is_file():
        return None, f"{python} does not exist"
    try:
        done = subprocess.run([python, str(PARTY_SCRIPT), "probe"], capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as err:
        return None, f"{python} could not be run ({err})"
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return None, f"{python} cannot import spu, jax, numpy and onnx ({last})"
    return json.loads(done.stdout.strip().splitlines()[-1]), ""


def find() -> Optional[Path]:
    """The SPU environment's python when it is usable, else None."""
    python = candidate()
    return python if _probe(str(python))[0] is not None else None


def versions() -> dict:
    """spu, jax, numpy, onnx and python versions of the SPU environment (FastmaskError when it is missing)."""
    return _probe(str(require()))[0]


def require() -> Path:
    """The SPU environment's python; FastmaskError in one line saying what to run when it is missing."""
    python = candidate()
    found, why = _probe(str(python))
    if found is not None:
        return python
    if os.environ.get(ENV_VAR):
        raise FastmaskError(f"the SPU runtime is not usable: {ENV_VAR}={python}: {why}; point it at a python with "
                            f"{' '.join(REQUIREMENTS)}, or unset it and run `{INSTALL_COMMAND}` (one time, ~1 GB)")
    raise FastmaskError(f"the SPU runtime is not installed ({why}); run `{INSTALL_COMMAND}` once (~1 GB into "
                        f"{default_venv()}), or set {ENV_VAR} to a python that has {' '.join(REQUIREMENTS)}")


def base_python() -> str:
    """A Python 3.10 or 3.11 interpreter to create the environment with (SPU 0.9.5 has wheels for those)."""
    override = os.environ.get(BASE_ENV_VAR)
    if override:
        return override
    if (3, 10) <= sys.version_info[:2] <= (3, 11):
        return sys.executable
    for name in ("python3.11", "python3.10"):
        found = shutil.which(name)
        if found:
            return found
    raise FastmaskError(f"SPU 0.9.5 needs Python 3.10 or 3.11 and none was found (this is {sys.version.split()[0]}); "
                        f"set {BASE_ENV_VAR} to one and run `{INSTALL_COMMAND}` again")


def install(venv: Optional[Path] = None, quiet: bool = False) -> Path:
    """Creates (or completes) the SPU environment; returns its python."""
    venv = Path(venv) if venv else default_venv()
    python = _venv_python(venv)
    out = subprocess.DEVNULL if quiet else None
    if not python.is_file():
        print(f"[fastmask] creating the SPU environment in {venv}", flush=True)
        subprocess.run([base_python(), "-m", "venv", str(venv)], check=True, stdout=out)
    print(f"[fastmask] installing {' '.join(REQUIREMENTS)} into {venv} (about 1 GB)", flush=True)
    pip = [str(python), "-m", "pip", "install", "--disable-pip-version-check", *(["-q"] if quiet else [])]
    done = subprocess.run([*pip, *REQUIREMENTS], stdout=out)
    if done.returncode != 0:
        raise FastmaskError(f"installing {' '.join(REQUIREMENTS)} into {venv} failed (pip exit {done.returncode}); "
                            "see pip's output above")
    _probe.cache_clear()
    found, why = _probe(str(python))
    if found is None:
        raise FastmaskError(f"the SPU environment in {venv} was installed but does not work: {why}")
    print(f"[fastmask] SPU environment ready: {python} ({', '.join(f'{k} {v}' for k, v in found.items())})")
    return python


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastmask.pi.spu_env",
                                     description="Find or create the separate environment SecretFlow SPU runs in.")
    parser.add_argument("--install", action="store_true", help="create it (default place, or --venv) and install SPU")
    parser.add_argument("--venv", type=Path, help=f"where to create it (default {default_venv()})")
    parser.add_argument("--quiet", action="store_true", help="less of pip's output")
    args = parser.parse_args(argv)
    try:
        if args.install:
            python = install(args.venv, quiet=args.quiet)
            if args.venv and Path(args.venv).resolve() != default_venv().resolve():
                print(f"[fastmask] set {ENV_VAR}={python} so that fastmask-pi finds it")
        else:
            python = require()
            print(f"{python}: " + ", ".join(f"{k} {v}" for k, v in versions().items()))
    except FastmaskError as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
