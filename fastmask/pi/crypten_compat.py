"""The one place that makes CrypTen 0.4.1 (its latest release, 2022) run on today's torch.

What it works around, each checked against torch 2.14:
- `import crypten` imports torch.onnx._internal.registration, which torch moved to
  torch.onnx._internal.torchscript_exporter.registration: the old name is aliased to the new module.
- crypten.nn.from_pytorch needs torch's legacy ONNX exporter; fastmask never calls it: it imports its own ONNX file
  with crypten.nn.from_onnx, whose graph holds only ops CrypTen reads (see fastmask.pi.export).
- CrypTen's wheel depends on the deprecated `sklearn` placeholder, which installs only with
  SKLEARN_ALLOW_DEPRECATED_SKLEARN_PACKAGE_INSTALL=True (an install-time matter; nothing here).
- With few cores, two parties each running torch's full thread pool can stall each other: every party process gets
  OMP_NUM_THREADS=1 (party_environment) and torch.set_num_threads(1).
"""
from __future__ import annotations

import importlib
import os
import sys

from ..errors import FastmaskError

_OLD_REGISTRATION = "torch.onnx._internal.registration"
_NEW_REGISTRATION = "torch.onnx._internal.torchscript_exporter.registration"


def import_crypten():
    """crypten and crypten.nn, importable on this torch; FastmaskError when CrypTen is not installed."""
    try:
        importlib.import_module(_OLD_REGISTRATION)
    except ImportError:
        try:
            sys.modules[_OLD_REGISTRATION] = importlib.import_module(_NEW_REGISTRATION)
        except ImportError:
            pass  # neither exists: let crypten's own import say what is missing
    try:
        import crypten
        import crypten.nn  # noqa: F401
    except ImportError as err:
        raise FastmaskError(f"CrypTen is not usable here ({err}); install it with "
                            "SKLEARN_ALLOW_DEPRECATED_SKLEARN_PACKAGE_INSTALL=True pip install -e .[pi]") from err
    return crypten


def party_environment(rank: int, world_size: int, rendezvous: str) -> dict:
    """The environment of one party process: CrypTen's rendezvous settings and one thread per party."""
    env = dict(os.environ)
    env.update({"WORLD_SIZE": str(world_size), "RANK": str(rank), "RENDEZVOUS": rendezvous,
                "DISTRIBUTED_BACKEND": "gloo", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    return env
