"""fastmask: cut the ReLU count of a trained network for private inference (Block Coordinate Descent over masks)."""
from __future__ import annotations

__version__ = "0.1.0"  # before the imports below: modules read it while the package loads

from . import models
from .api import Linearized, linearize
from .errors import FastmaskError
from .masks import MaskSet
from .nn import MaskedReLU, convert, masked_sites, relu_count
from .ops.masked_act import masked_relu


def backend() -> dict:
    """Which implementation each op uses on each device here, and whether the compiled extension loaded."""
    from .ops import backends

    devices = ["cpu"]
    import torch

    if torch.cuda.is_available():
        devices.append("cuda")
    report = {"extension": backends.extension_status()}
    report["masked_act"] = {d: backends.select(d) for d in devices}
    report["conv_bn_act"] = {d: backends.select(d, has_ext_kernel=False) for d in devices}
    return report


def score_hypotheses(*args, **kwargs):
    """Scores K candidate masks on fixed images; see fastmask.search.scoring.score_hypotheses."""
    from .search.scoring import score_hypotheses as _score

    return _score(*args, **kwargs)


__all__ = ["FastmaskError", "Linearized", "MaskSet", "MaskedReLU", "backend", "convert", "linearize", "masked_relu",
           "masked_sites", "models", "relu_count", "score_hypotheses"]
