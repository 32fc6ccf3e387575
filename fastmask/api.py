"""fastmask.linearize: the pipeline from a notebook, on a model and tensors already in memory.

    import fastmask as fm
    result = fm.linearize(model, (images, labels), targets=[20000, 15000], ref_budget=30000, out="runs/mine")
    small = result[15000].model      # the model at 15,000 ReLUs; result[15000].masks: {site: bool mask}

`model` is any nn.Module whose ReLUs are calls (modules, F.relu, .relu()); it is converted once (fastmask.convert).
`data` is (uint8 images [N, C, H, W] or [N, H, W, C], int labels [N]) or a torch Dataset of (image, label) pairs
(uint8, or float in [0, 1]). The settings are fastmask-linearize's, by their flag names with _ (drc=100,
snl_epochs=50, finetune_epochs=2 ...). With `out`, the run writes what the command writes there and `resume=True`
continues it; without, it runs in a temporary folder and returns the models alone.
"""
from __future__ import annotations

import copy
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn as nn

from . import config as settings
from .data import FOLDER_TEST_FRACTION, FOLDER_TEST_SEED, Dataset, _per_class_fraction, channel_stats, split_indices
from .errors import FastmaskError
from .models import external
from .nn import MaskedReLU, masked_sites


@dataclass
class Linearized:
    """One target's model, its masks ({site name: bool mask}) and its measurements (ReLU count, val/test acc)."""

    model: nn.Module
    masks: dict[str, torch.Tensor]
    metrics: dict = field(default_factory=dict)
    method: str = "bcd"


def _as_tensors(data: Any, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], torch.Tensor):
        images, labels = data
    elif isinstance(data, torch.utils.data.Dataset):
        pairs = [data[i] for i in range(len(data))]
        if not pairs:
            raise FastmaskError(f"{name} is an empty Dataset")
        images = torch.stack([torch.as_tensor(p[0]) for p in pairs])
        labels = torch.as_tensor([int(p[1]) for p in pairs])
    else:
        raise FastmaskError(f"{name} must be (images, labels) tensors or a torch Dataset of (image, label) pairs, "
                            f"got {type(data).__name__}")
    labels = torch.as_tensor(labels).long().reshape(-1)
    if images.dtype.is_floating_point:
        if float(images.min()) < 0 or float(images.max()) > 1:
            raise FastmaskError(f"{name}: float images must be in [0, 1] (fastmask normalizes them itself)")
        images = (images * 255).round().to(torch.uint8)
    if images.dtype != torch.uint8:
        raise FastmaskError(f"{name}: images must be uint8 (0-255) or float in [0, 1], got {images.dtype}")
    if images.dim() == 3:
        images = images.unsqueeze(1)
    if images.dim() == 4 and images.shape[-1] in (1, 3) and images.shape[1] not in (1, 3):
        images = images.permute(0, 3, 1, 2)
    if images.dim() != 4 or images.shape[2] != images.shape[3] or images.shape[1] not in (1, 3):
        raise FastmaskError(f"{name}: images must be N x C x H x W (or N x H x W x C), square, 1 or 3 channels; got "
                            f"{tuple(images.shape)}")
    if len(labels) != len(images):
        raise FastmaskError(f"{name}: {len(images)} images but {len(labels)} labels")
    return images.contiguous(), labels


def make_dataset(data: Any, test: Any = None, val_size: float = 0.1, seed: int = 0, name: str = "memory",
                 mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None) -> Dataset:
    """A fastmask Dataset from tensors or a torch Dataset; without `test`, a fixed fifth of each class is the test
    split (reported, never used to choose)."""
    images, labels = _as_tensors(data, "data")
    if test is not None:
        test_x, test_y = _as_tensors(test, "test")
    else:
        test_idx = _per_class_fraction(labels, FOLDER_TEST_FRACTION, FOLDER_TEST_SEED)
        keep = torch.ones(len(labels), dtype=torch.bool)
        keep[test_idx] = False
        test_x, test_y = images[test_idx], labels[test_idx]
        images, labels = images[keep], labels[keep]
    classes = int(max(labels.max(), test_y.max() if len(test_y) else 0)) + 1
    if classes < 2 or int(labels.min()) < 0:
        raise FastmaskError(f"data: labels must be 0..K-1 with K >= 2, got {int(labels.min())}..{classes - 1}")
    train_idx, val_idx = split_indices(len(labels), val_size if val_size < 1 else int(val_size), seed)
    if mean is None or std is None:
        mean, std = channel_stats(images[train_idx])
    return Dataset(name=name, num_classes=classes, image_size=int(images.shape[-1]), in_channels=int(images.shape[1]),
                   mean=tuple(float(m) for m in mean), std=tuple(float(s) for s in std),
                   classes=[str(c) for c in range(classes)], train_x=images[train_idx], train_y=labels[train_idx],
                   val_x=images[val_idx], val_y=labels[val_idx], test_x=test_x, test_y=test_y)


def linearize(model: nn.Module, data: Any, targets: Sequence[int], *, test: Any = None, out: Optional[str] = None,
              resume: bool = False, trained: bool = True, progress: bool = False,
              log: Optional[Callable[[str], None]] = None, **options) -> dict[int, Linearized]:
    """Cuts `model`'s ReLUs to each of `targets` (see the module docstring); returns {target: Linearized}. With
    method="snl" the targets are SNL's, with "both" BCD's (SNL's are under result["snl"]). trained=False trains a
    baseline first (baseline_epochs=...)."""
    from .pipeline import Pipeline

    flags = {"bcd.targets": list(targets), "data.dataset": "memory"}
    for key, value in options.items():
        setting = settings.BY_DEST.get(key)
        if setting is None or setting.path in ("data.dataset", "data.data_dir", "model.arch", "model.checkpoint",
                                               "data.image_size"):
            raise FastmaskError(f"linearize() has no setting {key!r}; it takes fastmask-linearize's settings by their "
                                "flag names with _ (e.g. drc=100, snl_epochs=50, finetune_epochs=2)")
        flags[setting.path] = value
    with tempfile.TemporaryDirectory(prefix="fastmask-") as scratch:
        flags["out"] = str(out) if out is not None else str(Path(scratch) / "run")
        config = settings.validate(settings.resolve(flags))
        dataset = make_dataset(data, test, val_size=config.data.val_size, seed=config.seed,
                               mean=config.data.mean, std=config.data.std)
        converted = _converted(model, dataset)
        pipeline = Pipeline.prepare(config, resume=resume, progress=progress, log=log or (lambda message: None),
                                    dataset=dataset, model=converted, trained=trained)
        summary = pipeline.run()
        run_dir = Path(config.out)
        result: dict = {}
        for section, method in (("targets", "bcd"), ("snl_targets", "snl")):
            if section not in summary:
                continue
            folder = "targets" if section == "targets" else "snl_targets"
            entries = {}
            for row in summary[section]:
                budget = int(row["budget"])
                loaded = pipeline.load(run_dir / folder / str(budget) / "model.safetensors").cpu()
                entries[budget] = Linearized(loaded, {n: s.mask.clone() for n, s in masked_sites(loaded)},
                                             {k: v for k, v in row.items() if not isinstance(v, (list, dict))}, method)
            if method == "bcd" or config.method == "snl":
                result.update(entries)
            else:
                result["snl"] = entries
        return result


def _converted(model: nn.Module, dataset: Dataset) -> nn.Module:
    """The model as the pipeline takes it: fastmask's own and converted models as they are, others converted."""
    if getattr(model, "fastmask_spec", None) and any(isinstance(m, MaskedReLU) for m in model.modules()):
        return copy.deepcopy(model)
    arch = f"{type(model).__module__}:{type(model).__qualname__}"  # its class, called again when a checkpoint loads
    return external.convert_plain(copy.deepcopy(model), arch, dataset.num_classes, dataset.image_size,
                                  dataset.in_channels)
