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
(Adam moves an alpha by about lr per step, so the L1 pull alone takes ~990 steps to bring 1 to 0.01). Raise lambda0
for small models and short runs (the offline demo uses 1e-3).

The settings (fastmask.config.SNLConfig) are the run config's `snl` section.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, Optional

import torch
import torch.nn as nn

from .. import train as training
from ..config import SNLConfig
from ..data import Dataset
from ..distributed import Group
from ..errors import FastmaskError
from ..masks import MaskSet


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


def run_snl(model: nn.Module, dataset: Dataset, budget: int, config: SNLConfig, device, *, seed: int = 0,
            max_epochs: Optional[int] = None, finetune: Optional[training.TrainConfig] = None,
            finetune_max_steps: Optional[int] = None, teacher: Optional[nn.Module] = None, progress: bool = True,
            on_epoch: Optional[Callable[[int, dict, nn.Module], Optional[str]]] = None,
            group: Optional[Group] = None) -> dict:
    """Runs SNL on `model` in place down to exactly `budget` ReLUs, then finetunes it with `finetune` (none when
    None; at most finetune_max_steps steps); returns the history. max_epochs overrides config.epochs.

    on_epoch(epoch, row, model) is called after every epoch of both phases (row["phase"] is "snl" or
    "finetune"); returning "stop" ends that phase early.
    """
    masks = MaskSet(model)
    start_count = masks.count()
    if budget < 0:
        raise FastmaskError(f"SNL budget must be >= 0, got {budget}")
    if budget >= start_count:
        raise FastmaskError(f"SNL budget {budget} is not below the model's {start_count} present ReLUs; "
                            "choose a smaller budget")
    max_epochs = config.epochs if max_epochs is None else max_epochs
    if max_epochs <= 0:
        raise FastmaskError(f"SNL needs max_epochs > 0, got {max_epochs}")
    model.to(device)
    state = {"lambda": config.lambda0, "lowest": start_count, "reached": False}
    snl_history: list[dict] = []

    def after_snl_epoch(epoch: int, row: dict, trained: nn.Module) -> Optional[str]:
        count = soft_count(masks, config.threshold)
        row.update({"phase": "snl", "relu_count": count, "lambda": state["lambda"]})
        snl_history.append(row)
        # SNL's rule: a new low is remembered; otherwise (after the first epochs) lambda grows.
        if count < state["lowest"]:
            state["lowest"] = count
        elif epoch - 1 >= config.stall_patience:
            state["lambda"] *= config.lambda_growth
        stop = on_epoch(epoch, row, trained) if on_epoch is not None else None
        if count <= budget:
            state["reached"] = True
            return "stop"
        return stop

    search_config = training.TrainConfig(epochs=max_epochs, optimizer="adam", lr=config.lr, weight_decay=0.0,
                                         seed=seed, lr_schedule="constant")
    started = time.perf_counter()
    with masks.alphas() as alphas:  # present ReLUs start at alpha 1; absent ones stay at 0, gradient-frozen
        def l1_penalty(_model: nn.Module) -> torch.Tensor:
            return state["lambda"] * sum(alpha.abs().sum() for alpha in alphas)

        training.train(model, dataset, search_config, device, teacher=teacher, extra_params=alphas,
                       loss_hook=l1_penalty, on_epoch=after_snl_epoch, progress=progress, group=group)
        count_at_stop = soft_count(masks, config.threshold)
        binarize(masks, budget)
    if any(site.coeffs is not None for site in masks.sites):
        # A polynomial replacement amplifies stale BN statistics site after site (eval-mode outputs overflow).
        # The identity does not, and keeps SNL exactly as published.
        training.recalibrate_batchnorm(model, dataset, device)
    search_seconds = time.perf_counter() - started
    after_binarize = training.evaluate(model, dataset.val_x, dataset.val_y, dataset, device)

    finetune_history: list[dict] = []
    if finetune is not None:
        def after_finetune_epoch(epoch: int, row: dict, trained: nn.Module) -> Optional[str]:
            row["phase"] = "finetune"
            return on_epoch(epoch, row, trained) if on_epoch is not None else None

        finetune_history = training.train(model, dataset, dataclasses.replace(finetune, seed=seed), device,
                                          teacher=teacher, on_epoch=after_finetune_epoch, progress=progress,
                                          max_steps=finetune_max_steps, group=group)
    final_val = training.evaluate(model, dataset.val_x, dataset.val_y, dataset, device)
    return {
        "budget": budget,
        "start_count": start_count,
        "relu_count": masks.count(),
        "reached_budget": state["reached"],
        "stop_reason": "budget reached" if state["reached"] else
                       f"max_epochs ({max_epochs}) spent; binarized to the budget's top alphas anyway",
        "snl_epochs": len(snl_history),
        "soft_count_at_stop": count_at_stop,
        "final_lambda": state["lambda"],
        "val_acc_after_binarize": after_binarize[0],
        "val_loss_after_binarize": after_binarize[1],
        "val_acc": final_val[0],
        "val_loss": final_val[1],
        "snl_seconds": search_seconds,
        "alpha_images": snl_history[-1]["images"] if snl_history else 0,
        "finetune_images": finetune_history[-1]["images"] if finetune_history else 0,
        "finetune_seconds": sum(row["seconds"] for row in finetune_history),
        "history": snl_history,
        "finetune_history": finetune_history,
    }
