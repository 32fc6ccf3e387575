"""Train, finetune and evaluate: SGD or Adam, cosine LR per step, CE + optional knowledge distillation.

One function, train(), serves the baseline, SNL's alpha phase (through loss_hook and extra_params) and every
finetune (finetune_config). On CUDA it uses bf16 autocast and channels-last; on the CPU it is deterministic given
the config's seed (same seed, same weights, bit for bit). A NaN or infinite loss restores the model to its state at
the start of the epoch and raises TrainingDiverged.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import cpu_memory
from .config import FinetuneConfig
from .data import Dataset, iterate_batches, steps_per_epoch
from .distributed import Group, is_main, share
from .errors import FastmaskError

OPTIMIZERS = ("sgd", "adam")
LR_SCHEDULES = ("cosine", "constant")
# How often (in steps) the loss is checked for NaN/inf on CUDA; each check syncs the device. On the CPU: every step.
CUDA_LOSS_CHECK_EVERY = 25


class TrainingDiverged(FastmaskError):
    """The loss became NaN or infinite; the model was restored to its last good state (start of the epoch)."""


@dataclass
class TrainConfig:
    epochs: int
    optimizer: str
    lr: float
    momentum: float = 0.9
    weight_decay: Optional[float] = None  # None: 5e-4 for SGD, 0 for Adam
    batch_size: int = 128
    augment: bool = True
    kd_temperature: float = 4.0
    # loss = (1 - w) * CE + w * KD, used only with a teacher. (SNL's own code adds CE + KD unweighted, which is
    # w = 0.5 at twice the scale.)
    kd_weight: float = 0.9
    amp: bool = True  # bf16 autocast, CUDA only
    channels_last: bool = True  # CUDA only
    seed: int = 0
    lr_schedule: str = "cosine"  # "cosine" (per step, to 0) or "constant" (SNL's alpha phase)

    def __post_init__(self):
        self.optimizer = self.optimizer.lower()
        if self.optimizer not in OPTIMIZERS:
            raise FastmaskError(f"unknown optimizer {self.optimizer!r}; use sgd or adam")
        if self.lr_schedule not in LR_SCHEDULES:
            raise FastmaskError(f"unknown lr schedule {self.lr_schedule!r}; use cosine or constant")
        if self.epochs <= 0:
            raise FastmaskError(f"epochs must be positive, got {self.epochs}")
        if not self.lr > 0:
            raise FastmaskError(f"learning rate must be positive, got {self.lr}")
        if self.batch_size <= 0:
            raise FastmaskError(f"batch size must be positive, got {self.batch_size}")
        if not 0 <= self.kd_weight <= 1 or self.kd_temperature <= 0:
            raise FastmaskError(f"need 0 <= kd_weight <= 1 and kd_temperature > 0, got {self.kd_weight} and "
                                f"{self.kd_temperature}")
        if self.weight_decay is None:
            self.weight_decay = 5e-4 if self.optimizer == "sgd" else 0.0


def baseline_config(epochs: int) -> TrainConfig:
    """Training from scratch: SGD 0.1, momentum 0.9, weight decay 5e-4, cosine, crop + flip."""
    return TrainConfig(epochs=epochs, optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=5e-4, augment=True)


FINETUNE_LR = {"sgd": 1e-3, "adam": 3.5e-5}


def finetune_config(arch: str, epochs: int, lr: Optional[float] = None, optimizer: Optional[str] = None
                    ) -> TrainConfig:
    """The paper's finetune recipes: ResNet18 SGD 1e-3 cosine; Wide-ResNet Adam 3.5e-5 cosine."""
    default = "adam" if arch.startswith("wide_resnet") else "sgd"
    optimizer = (optimizer or default).lower()
    if optimizer not in OPTIMIZERS:
        raise FastmaskError(f"unknown optimizer {optimizer!r}; use sgd or adam")
    return TrainConfig(epochs=epochs, optimizer=optimizer, lr=lr if lr is not None else FINETUNE_LR[optimizer])


def finetune_recipe(finetune: FinetuneConfig, arch: str, dataset_name: str, epochs: Optional[int] = None
                    ) -> TrainConfig:
    """A run's finetune (its finetune settings on this arch and dataset; `epochs` overrides theirs): the one place
    BCD's steps, SNL's finetunes and the pipeline get it from."""
    return finetune_config(arch, finetune.epochs_for(dataset_name) if epochs is None else epochs, lr=finetune.lr,
                           optimizer=finetune.optimizer)


# ---- evaluation -------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_tensors(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 512
                     ) -> tuple[float, float]:
    """(accuracy %, mean cross-entropy) of already-normalized images, in eval mode; (nan, nan) when empty."""
    if len(labels) == 0:
        return float("nan"), float("nan")
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.int64, device=labels.device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=labels.device)
    for start in range(0, len(labels), batch_size):
        logits = model(images[start:start + batch_size]).float()
        target = labels[start:start + batch_size]
        correct += (logits.argmax(1) == target).sum()
        loss_sum += F.cross_entropy(logits, target, reduction="sum").double()
    model.train(was_training)
    return 100.0 * int(correct) / len(labels), float(loss_sum) / len(labels)


def _eval_logits(model: nn.Module, x_uint8: torch.Tensor, y: torch.Tensor, dataset: Dataset, device,
                 batch_size: int):
    """(fp32 logits, labels) batch by batch over a uint8 split in order, in eval mode, without augmentation (the
    model's train/eval flag is restored when the loop ends)."""
    was_training = model.training
    model.eval()
    try:
        for images, labels in iterate_batches(x_uint8, y, dataset, batch_size, device, shuffle=False, augment=False):
            yield model(_to_model_format(images, model)).float(), labels
    finally:
        model.train(was_training)


@torch.no_grad()
def evaluate(model: nn.Module, x_uint8: torch.Tensor, y: torch.Tensor, dataset: Dataset, device,
             batch_size: int = 512) -> tuple[float, float]:
    """(accuracy %, mean cross-entropy) of a uint8 split, in eval mode, without augmentation."""
    if len(y) == 0:
        return float("nan"), float("nan")
    correct, loss_sum = 0, 0.0
    for logits, labels in _eval_logits(model, x_uint8, y, dataset, device, batch_size):
        correct += int((logits.argmax(1) == labels).sum())
        loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
    return 100.0 * correct / len(y), loss_sum / len(y)


@torch.no_grad()
def correct_per_image(model: nn.Module, x_uint8: torch.Tensor, y: torch.Tensor, dataset: Dataset, device,
                      batch_size: int = 512) -> torch.Tensor:
    """Whether each image of a uint8 split is classified right (bool [len(y)], on the CPU), as evaluate counts it:
    two models compared on the same images give a paired difference."""
    right = [(logits.argmax(1) == labels).cpu()
             for logits, labels in _eval_logits(model, x_uint8, y, dataset, device, batch_size)]
    return torch.cat(right) if right else torch.zeros(0, dtype=torch.bool)


def _to_model_format(images: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """Channels-last images for a channels-last model (so cuDNN does not convert every batch)."""
    weight = next((p for p in model.parameters() if p.dim() == 4), None)
    if weight is not None and weight.is_cuda and weight.is_contiguous(memory_format=torch.channels_last):
        return images.contiguous(memory_format=torch.channels_last)
    return images


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, dataset: Dataset, device, images: int = 2048,
                          batch_size: int = 256) -> None:
    """Re-estimates every BatchNorm's running statistics on `images` train images (no augmentation, no gradient).

    After a sudden change of the activations (SNL's binarization) the running statistics describe a network that no
    longer exists; with a polynomial replacement the stale statistics compound from site to site until eval-mode
    outputs overflow."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    was_training = model.training
    # A fixed random subset: a split stored class by class would otherwise give the statistics of a few classes.
    index = torch.randperm(len(dataset.train_y), generator=torch.Generator().manual_seed(0))[:images].sort().values
    try:
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the batches below
        model.train()
        for x, _ in iterate_batches(dataset.train_x[index], dataset.train_y[index], dataset, batch_size, device,
                                    shuffle=False, augment=False):
            model(_to_model_format(x, model))
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.train(was_training)


# ---- training ---------------------------------------------------------------------------------------------------
def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
                      ) -> torch.Tensor:
    """Hinton's KD: KL(softmax(teacher / T) || softmax(student / T)) * T^2, batch mean (as SNL's code)."""
    return F.kl_div(F.log_softmax(student_logits / temperature, dim=1),
                    F.softmax(teacher_logits / temperature, dim=1), reduction="batchmean") * temperature ** 2


def _build_optimizer(model: nn.Module, extra_params: Iterable[torch.Tensor], config: TrainConfig):
    extra = [p for p in extra_params]
    extra_ids = {id(p) for p in extra}
    # Extra parameters (SNL's alphas) carry their own regularizer, so they get no weight decay.
    groups = [{"params": [p for p in model.parameters() if p.requires_grad and id(p) not in extra_ids],
               "weight_decay": config.weight_decay}]
    if extra:
        groups.append({"params": extra, "weight_decay": 0.0})
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum)
    return torch.optim.Adam(groups, lr=config.lr)


class CarriedOptimizer:
    """One optimizer across a sequence of train() calls, so that they train as one run: BCD's step finetunes under
    `finetune.step_schedule continuous`, which keep training through the removals as SNL's alpha phase does,
    instead of restarting an optimizer (and, with Adam, its moment estimates) at every step.

    Built on the first call, from that call's model and config; its state goes to and comes back from flat tensors,
    which a resumable run writes into its state file (no pickle)."""

    def __init__(self):
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self._params: list[int] = []
        self._pending: Optional[dict[str, torch.Tensor]] = None

    def for_model(self, model: nn.Module, extra: list[torch.Tensor], config: TrainConfig) -> torch.optim.Optimizer:
        params = [id(p) for p in model.parameters()] + [id(p) for p in extra]
        if self.optimizer is None:
            self.optimizer, self._params = _build_optimizer(model, extra, config), params
            if self._pending is not None:
                self._load(self._pending)
                self._pending = None
        elif params != self._params:  # a bug in the caller: the state belongs to other parameters
            raise RuntimeError("CarriedOptimizer reused on another model's parameters")
        return self.optimizer

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """{"<param index>.<name>": tensor} of every per-parameter state (Adam's moments and step, SGD's momentum);
        empty before the first call."""
        if self.optimizer is None:
            return dict(self._pending or {})
        return {f"{index}.{name}": (value if torch.is_tensor(value) else torch.tensor(value)).detach().cpu().clone()
                for index, state in self.optimizer.state_dict()["state"].items() for name, value in state.items()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restores state_tensors()'s output; before the first call it is kept until the optimizer is built."""
        if self.optimizer is None:
            self._pending = dict(tensors) or None
        else:
            self._load(tensors)

    def _load(self, tensors: dict[str, torch.Tensor]) -> None:
        state: dict[int, dict] = {}
        for key, value in tensors.items():
            index, _, name = key.partition(".")
            state.setdefault(int(index), {})[name] = value.clone()
        saved = self.optimizer.state_dict()
        self.optimizer.load_state_dict({"state": state, "param_groups": saved["param_groups"]})


def _lr_at(step: int, total_steps: int, config: TrainConfig) -> float:
    if config.lr_schedule == "constant":
        return config.lr
    return 0.5 * config.lr * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))


def _snapshot(model: nn.Module, extra: list[torch.Tensor]) -> tuple[dict, list[torch.Tensor]]:
    return ({k: v.detach().clone() for k, v in model.state_dict().items()}, [p.detach().clone() for p in extra])


def _restore(model: nn.Module, extra: list[torch.Tensor], snapshot: tuple[dict, list[torch.Tensor]]) -> None:
    state, extra_values = snapshot
    model.load_state_dict(state)
    with torch.no_grad():
        for p, value in zip(extra, extra_values):
            p.copy_(value)


def optimizer_steps(train_size: int, config: TrainConfig, max_steps: Optional[int] = None) -> int:
    """The optimizer steps train() takes on a train split of train_size images: config.epochs whole epochs, or
    max_steps when fewer."""
    steps = config.epochs * steps_per_epoch(train_size, config.batch_size)
    return steps if max_steps is None else min(steps, max_steps)


def train(model: nn.Module, dataset: Dataset, config: TrainConfig, device, *, teacher: Optional[nn.Module] = None,
          extra_params: Iterable[torch.Tensor] = (), loss_hook: Optional[Callable[[nn.Module], torch.Tensor]] = None,
          on_epoch: Optional[Callable[[int, dict, nn.Module], Optional[str]]] = None, progress: bool = True,
          max_steps: Optional[int] = None, group: Optional[Group] = None,
          carried: Optional[CarriedOptimizer] = None) -> list[dict]:
    """Trains `model` in place on dataset's train split; returns one history row per epoch.

    Loss: CE, or (1 - kd_weight) * CE + kd_weight * KD when a teacher is given, plus loss_hook(model) when given.
    The LR follows a per-step cosine from config.lr to 0 over min(epochs * steps_per_epoch, max_steps) steps.
    on_epoch(epoch, row, model) runs after each epoch's validation; returning "stop" ends training.
    max_steps ends training after that many optimizer steps in total (a fractional-epoch finetune).
    carried: an optimizer kept from an earlier call (its state goes on) instead of a new one.
    With a `group` (torchrun), every process draws the same global batches and trains on its share of each, and DDP
    averages the gradients: the batch size and learning rate mean what they mean for one process. BatchNorm
    normalizes with each process's share, and its running statistics are rank 0's after every epoch. Rows count
    the images of the whole group.
    """
    progress = progress and is_main(group)
    if max_steps is not None and max_steps <= 0:
        raise FastmaskError(f"max_steps must be positive, got {max_steps}")
    if len(dataset.train_y) == 0:
        raise FastmaskError("the train split is empty; use a dataset with training images")
    device = torch.device(device)
    if device.type == "cpu":  # a training step spent about 10% of its time in page faults without it
        cpu_memory.keep_freed_memory()
    _place(model, teacher, config, device)
    extra = list(extra_params)
    optimizer = carried.for_model(model, extra, config) if carried is not None else _build_optimizer(model, extra,
                                                                                                      config)
    net = _data_parallel(model, device, group)
    per_epoch = steps_per_epoch(len(dataset.train_y), config.batch_size)
    total_steps = optimizer_steps(len(dataset.train_y), config, max_steps)
    generator = torch.Generator().manual_seed(int(config.seed))
    was_training = model.training
    history: list[dict] = []
    step = images = 0
    try:
        for epoch in range(1, config.epochs + 1):
            started = time.perf_counter()
            steps = min(per_epoch, total_steps - step)
            batches = iterate_batches(dataset.train_x, dataset.train_y, dataset, config.batch_size, device,
                                      shuffle=True, augment=config.augment, generator=generator)
            train_loss, train_acc, seen = _train_epoch(model, net, teacher, extra, optimizer, batches, config,
                                                       device, loss_hook, epoch, first_step=step, steps=steps,
                                                       total_steps=total_steps, progress=progress, group=group)
            if group is not None:  # BatchNorm statistics: each process updated them from its own share
                group.broadcast_state_(model)
            step += steps
            images += seen
            val_acc, val_loss = evaluate(model, dataset.val_x, dataset.val_y, dataset, device)
            row = {"epoch": epoch, "train_loss": train_loss, "train_acc": train_acc, "val_acc": val_acc,
                   "val_loss": val_loss, "lr": _lr_at(step, total_steps, config), "steps": step, "images": images,
                   "seconds": time.perf_counter() - started}
            history.append(row)
            if progress:
                tqdm.write(f"epoch {epoch}/{config.epochs}: loss {train_loss:.4f}, train acc {train_acc:.2f}%, "
                           f"val acc {val_acc:.2f}%, {row['seconds']:.1f}s")
            if on_epoch is not None and on_epoch(epoch, row, model) == "stop":
                break
            if step >= total_steps:
                break
    finally:
        model.train(was_training)
    return history


def _place(model: nn.Module, teacher: Optional[nn.Module], config: TrainConfig, device: torch.device) -> None:
    """Model and teacher on the device; channels-last on CUDA, where cuDNN runs convs faster in it."""
    channels_last = device.type == "cuda" and config.channels_last
    for m in (model, teacher):
        if m is not None:
            m.to(device)
            if channels_last:
                m.to(memory_format=torch.channels_last)
    if teacher is not None:
        teacher.eval()


def _data_parallel(model: nn.Module, device: torch.device, group: Optional[Group]) -> nn.Module:
    """What the forward runs through: the model, or DDP around it (its gradients averaged over the group)."""
    if group is None:
        return model
    from torch.nn.parallel import DistributedDataParallel

    # A polynomial site whose ReLUs are all present leaves its coefficients out of the graph.
    unused = any(getattr(m, "coeffs", None) is not None for m in model.modules())
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=unused)


def _my_share(images: torch.Tensor, labels: torch.Tensor, group: Optional[Group]
              ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(images, labels, loss weight) of this process's share of a global batch. The weight makes the DDP average of
    the processes' mean losses the global batch's mean loss, also when the shares differ in size; a process whose
    share is empty (a last batch smaller than the group) runs one image with weight 0, since DDP needs every
    process in every backward."""
    if group is None:
        return images, labels, 1.0
    part = share(len(labels), group)
    if part.stop > part.start:
        return images[part], labels[part], (part.stop - part.start) * group.size / len(labels)
    return images[:1], labels[:1], 0.0


def _train_epoch(model, net, teacher, extra, optimizer, batches, config: TrainConfig, device, loss_hook, epoch: int,
                 *, first_step: int, steps: int, total_steps: int, progress: bool, group: Optional[Group] = None
                 ) -> tuple[float, float, int]:
    """One epoch of `steps` optimizer steps; (mean train loss, train accuracy %, images trained on by the group).

    The loss is checked for NaN/inf every CUDA_LOSS_CHECK_EVERY steps on CUDA (each check syncs), every step on the
    CPU, and at the epoch's end; a bad loss restores the model to the epoch's start and raises TrainingDiverged
    (in every process of a group: the check is on the group's summed loss)."""
    on_cuda = device.type == "cuda"
    check_every = CUDA_LOSS_CHECK_EVERY if on_cuda else 1
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if on_cuda and config.amp else contextlib.nullcontext()
    last_good = _snapshot(model, extra)
    model.train()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    seen = 0
    bar = tqdm(batches, total=steps, desc=f"epoch {epoch}/{config.epochs}", leave=False, disable=not progress,
               dynamic_ncols=True)
    for done, (images, labels) in enumerate(bar, start=1):
        if done > steps:
            break
        step = first_step + done - 1
        lr = _lr_at(step, total_steps, config)
        for param_group in optimizer.param_groups:
            param_group["lr"] = lr
        batch_images = len(labels)
        images, labels, weight = _my_share(images, labels, group)
        images = _to_model_format(images, model)
        with autocast:
            logits = net(images)
            loss = _loss(logits, labels, images, teacher, config)
        if loss_hook is not None:
            loss = loss + loss_hook(model)
        optimizer.zero_grad(set_to_none=True)
        (loss * weight if group is not None else loss).backward()
        optimizer.step()
        mine = len(labels) if weight else 0
        loss_sum += loss.detach().double() * mine
        correct += (logits.detach().argmax(1) == labels).sum() * bool(mine)
        seen += batch_images
        if (step + 1) % check_every == 0 or done == steps:
            running = float(_group_sum(loss_sum, group)) / seen
            if not math.isfinite(running):
                _restore(model, extra, last_good)
                raise TrainingDiverged(f"training diverged at epoch {epoch}, step {step + 1} (loss {running}); the "
                                       "model was restored to the start of the epoch: lower the learning rate")
            bar.set_postfix(loss=f"{running:.4f}", lr=f"{lr:.2e}")
    bar.close()
    return (float(_group_sum(loss_sum, group)) / max(seen, 1), 100.0 * int(_group_sum(correct, group)) / max(seen, 1),
            seen)


def _group_sum(total: torch.Tensor, group: Optional[Group]) -> torch.Tensor:
    return total if group is None else group.all_reduce_sum_(total.clone())


def _loss(logits: torch.Tensor, labels: torch.Tensor, images: torch.Tensor, teacher: Optional[nn.Module],
          config: TrainConfig) -> torch.Tensor:
    loss = F.cross_entropy(logits.float(), labels)
    if teacher is None:
        return loss
    with torch.no_grad():
        teacher_logits = teacher(images).float()
    kd = distillation_loss(logits.float(), teacher_logits, config.kd_temperature)
    return (1.0 - config.kd_weight) * loss + config.kd_weight * kd
