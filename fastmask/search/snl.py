"""SNL (Cho et al. 2022, Selective Network Linearization): how B_ref is made, and the baseline BCD must beat.

Every present ReLU gets a learnable alpha (init 1): the site computes alpha * relu(x) + (1 - alpha) * x. Weights and
alphas train together with Adam (constant LR, as SNL's code) on CE (+ KD from a teacher) + lambda * sum|alpha|.
A ReLU counts while alpha > threshold. lambda grows by lambda_growth after every epoch (from
stall_patience_start_epoch on, 0-based as SNL's code) in which the count did not reach a new low. Once the count is
at or below the budget (or max_epochs is spent), the masks are binarized to exactly `budget` ReLUs, the ones with the
largest alphas among those present, the alphas are detached, and the model is finetuned with the binary masks.

ReLUs already absent when SNL starts stay absent: their alpha is 0 and their gradient is masked to 0, so Adam never
moves them (the L1 subgradient of |0| is 0 too), and binarization only ranks present ReLUs.

On lambda0: SNL's 1e-5 is the default, but at small scale it barely moves the alphas for the first ~1,000 steps
(Adam moves an alpha by about lr per step, so the L1 pull alone takes ~990 steps to bring 1 to 0.01; see
../shared/notes/miniature-calibration.md, which used 1.1e-3). Raise lambda0 for small models and short runs.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn

from .. import train as training
from ..data import Dataset
from ..errors import FastmaskError
from ..masks import MaskSet


@dataclass
class SNLConfig:
    budget: int
    lr: float = 1e-3
    lambda0: float = 1e-5
    lambda_growth: float = 1.1
    threshold: float = 1e-2
    stall_patience_start_epoch: int = 5
    max_epochs: int = 2000  # SNL's own bound; the run stops as soon as the count is at or below the budget
    finetune_epochs: int = 100  # SNL's finetune length
    finetune_lr: Optional[float] = None  # None: finetune_config's default for the arch (SGD 1e-3 / Adam 3.5e-5)
    finetune_optimizer: Optional[str] = None
    batch_size: int = 128
    kd_temperature: float = 4.0
    kd_weight: float = 0.9  # used only with a teacher
    augment: bool = True
    seed: int = 0

    def __post_init__(self):
        if self.budget < 0:
            raise FastmaskError(f"SNL budget must be >= 0, got {self.budget}")
        if not self.lr > 0 or self.lambda0 < 0 or self.lambda_growth < 1 or self.threshold < 0:
            raise FastmaskError("SNL needs lr > 0, lambda0 >= 0, lambda_growth >= 1 and threshold >= 0; got "
                                f"{self.lr}, {self.lambda0}, {self.lambda_growth}, {self.threshold}")
        if self.max_epochs <= 0 or self.finetune_epochs < 0:
            raise FastmaskError(f"SNL needs max_epochs > 0 and finetune_epochs >= 0, got {self.max_epochs} and "
                                f"{self.finetune_epochs}")


def attach_alphas(masks: MaskSet) -> list[nn.Parameter]:
    """Gives every site an alpha: 1 where its ReLU is present, 0 (and frozen by a gradient mask) where absent."""
    alphas = []
    for site in masks.sites:
        keep = site.mask.detach().clone()
        alpha = nn.Parameter(keep.float())
        alpha.register_hook(lambda grad, keep=keep: grad * keep)
        site.alpha = alpha
        alphas.append(alpha)
    return alphas


def detach_alphas(masks: MaskSet) -> None:
    for site in masks.sites:
        site.alpha = None


def soft_count(masks: MaskSet, threshold: float) -> int:
    """ReLUs SNL still counts: alpha above the threshold at a present position."""
    return sum(int(((site.alpha.detach() > threshold) & site.mask).sum()) for site in masks.sites)


def binarize(masks: MaskSet, budget: int) -> None:
    """Keeps exactly `budget` ReLUs: the largest alphas among the present ones (ties: lower flat index)."""
    scores = torch.cat([site.alpha.detach().float().reshape(-1).cpu() for site in masks.sites])
    present = masks.flat()
    if budget > int(present.sum()):
        raise FastmaskError(f"cannot keep {budget} ReLUs: only {int(present.sum())} are present")
    scores = torch.where(present, scores, torch.full_like(scores, float("-inf")))
    order = torch.sort(scores, descending=True, stable=True).indices
    keep = torch.zeros_like(present)
    keep[order[:budget]] = True
    masks.set_flat(keep)


def run_snl(model: nn.Module, dataset: Dataset, config: SNLConfig, device, *, teacher: Optional[nn.Module] = None,
            progress: bool = True, on_epoch: Optional[Callable[[int, dict, nn.Module], Optional[str]]] = None
            ) -> dict:
    """Runs SNL on `model` in place down to exactly config.budget ReLUs, then finetunes it; returns the history.

    on_epoch(epoch, row, model) is called after every epoch of both phases (row["phase"] is "snl" or
    "finetune"); returning "stop" ends that phase early.
    """
    masks = MaskSet(model)
    start_count = masks.count()
    if config.budget >= start_count:
        raise FastmaskError(f"SNL budget {config.budget} is not below the model's {start_count} present ReLUs; "
                            "choose a smaller budget")
    arch = getattr(model, "fastmask_spec", {}).get("arch", "resnet18")
    model.to(device)
    alphas = attach_alphas(masks)
    state = {"lambda": config.lambda0, "lowest": start_count, "reached": False}

    def l1_penalty(_model: nn.Module) -> torch.Tensor:
        return state["lambda"] * sum(alpha.abs().sum() for alpha in alphas)

    snl_history: list[dict] = []

    def after_snl_epoch(epoch: int, row: dict, trained: nn.Module) -> Optional[str]:
        count = soft_count(masks, config.threshold)
        row.update({"phase": "snl", "relu_count": count, "lambda": state["lambda"]})
        snl_history.append(row)
        # SNL's rule: a new low is remembered; otherwise (after the first epochs) lambda grows.
        if count < state["lowest"]:
            state["lowest"] = count
        elif epoch - 1 >= config.stall_patience_start_epoch:
            state["lambda"] *= config.lambda_growth
        stop = on_epoch(epoch, row, trained) if on_epoch is not None else None
        if count <= config.budget:
            state["reached"] = True
            return "stop"
        return stop

    search_config = training.TrainConfig(epochs=config.max_epochs, optimizer="adam", lr=config.lr, weight_decay=0.0,
                                         batch_size=config.batch_size, augment=config.augment,
                                         kd_temperature=config.kd_temperature, kd_weight=config.kd_weight,
                                         seed=config.seed, lr_schedule="constant")
    started = time.perf_counter()
    try:
        training.train(model, dataset, search_config, device, teacher=teacher, extra_params=alphas,
                       loss_hook=l1_penalty, on_epoch=after_snl_epoch, progress=progress)
        count_at_stop = soft_count(masks, config.threshold)
        binarize(masks, config.budget)
    finally:
        detach_alphas(masks)
    search_seconds = time.perf_counter() - started
    after_binarize = training.evaluate(model, dataset.val_x, dataset.val_y, dataset, device)

    finetune_history: list[dict] = []
    if config.finetune_epochs > 0:
        finetune_config = training.finetune_config(arch, config.finetune_epochs, lr=config.finetune_lr,
                                                   optimizer=config.finetune_optimizer)
        finetune_config.batch_size = config.batch_size
        finetune_config.kd_temperature = config.kd_temperature
        finetune_config.kd_weight = config.kd_weight
        finetune_config.augment = config.augment
        finetune_config.seed = config.seed

        def after_finetune_epoch(epoch: int, row: dict, trained: nn.Module) -> Optional[str]:
            row["phase"] = "finetune"
            return on_epoch(epoch, row, trained) if on_epoch is not None else None

        finetune_history = training.train(model, dataset, finetune_config, device, teacher=teacher,
                                          on_epoch=after_finetune_epoch, progress=progress)
    final_val = training.evaluate(model, dataset.val_x, dataset.val_y, dataset, device)
    return {
        "budget": config.budget,
        "start_count": start_count,
        "relu_count": masks.count(),
        "reached_budget": state["reached"],
        "stop_reason": "budget reached" if state["reached"] else
                       f"max_epochs ({config.max_epochs}) spent; binarized to the budget's top alphas anyway",
        "snl_epochs": len(snl_history),
        "soft_count_at_stop": count_at_stop,
        "final_lambda": state["lambda"],
        "val_acc_after_binarize": after_binarize[0],
        "val_loss_after_binarize": after_binarize[1],
        "val_acc": final_val[0],
        "val_loss": final_val[1],
        "snl_seconds": search_seconds,
        "finetune_seconds": sum(row["seconds"] for row in finetune_history),
        "history": snl_history,
        "finetune_history": finetune_history,
    }
