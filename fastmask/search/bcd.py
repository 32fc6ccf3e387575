"""Block Coordinate Descent (the paper's Algorithm 2) as a resumable driver.

From a model at B_ref, each step removes DRC present ReLUs: it re-measures the reference on a fixed scoring subset,
samples RT candidates up front, scores them with fastmask.score_hypotheses (which stops early at the first candidate
under ADT), applies the accepted one (or the smallest drop when none passes), finetunes, and writes its whole state
atomically. One run passes several targets on the way down; each is saved and evaluated when the count lands on it.

The state file (checkpoints/last.pt) is a safetensors file: the model's state_dict (weights, BN statistics and masks)
and the RNG states as tensors (and a carried finetune optimizer's state), everything else as JSON in its metadata.
No pickle is written or read.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Sequence

import torch
import torch.nn as nn

from .. import __version__
from ..checkpoint import SPEC_KEY, model_spec, save_model
from ..config import BCDConfig, FinetuneConfig
from ..distributed import Group, is_main, masks_digest, share
from ..errors import FastmaskError
from ..files import atomic_write
from ..masks import MaskSet
from .compute import images_spent
from .pricing import LatencyPricing, choose_by_saving, kept_per_site
from .proposal import propose, removal_costs
from .racing import race
from .scoring import score_current, score_hypotheses

if TYPE_CHECKING:
    from .. import train

# 2: the search settings (proposal, scoring, ...) and the scoring subset are in the fingerprint; 3: the target
# finetune; 4: the fingerprint is every BCD setting (the options that measured nothing are gone); 5: the cost settings
# (--cost, --network, --protocol, --latency-targets)
STATE_VERSION = 5
STATE_FILE = Path("checkpoints") / "last.pt"
# ADT below this many standard errors of the scoring subset's accuracy picks candidates on noise (calibration note).
NOISE_STANDARD_ERRORS = 2.0


def accuracy_standard_error(accuracy_percent: float, images: int) -> float:
    """Binomial standard error of an accuracy measured on `images` images, in percentage points."""
    p = min(max(accuracy_percent / 100.0, 0.0), 1.0)
    return 100.0 * math.sqrt(p * (1.0 - p) / max(images, 1))


def choose(scores, reference: tuple[float, float], criterion: str) -> tuple[int, bool]:
    """(candidate index, fallback?): the accepted one when the stop rule found one, else the smallest drop among the
    scored candidates, ties broken by lower loss, then by order."""
    if scores.accepted is not None:
        return int(scores.accepted), False
    drops = scores.drop(reference, criterion)
    scored = [i for i in range(int(scores.scored)) if not math.isnan(float(drops[i]))]
    if not scored:
        raise RuntimeError("score_hypotheses scored no candidate")  # a bug in scoring, not user input
    return min(scored, key=lambda i: (float(drops[i]), float(scores.loss[i]), i)), True


def plan_removal(count: int, targets: Sequence[int], drc: int) -> tuple[int, int]:
    """(next target, ReLUs to remove this step): DRC, or exactly what is left so the count lands on the target."""
    target = next(t for t in targets if t < count)
    return target, min(int(drc), count - int(target))


# ---- the state file ----------------------------------------------------------------------------------------------
def save_state(path: Path, model: nn.Module, generator: torch.Generator, state: dict,
               optimizer: Optional[dict[str, torch.Tensor]] = None) -> None:
    """Writes atomically: a kill leaves either the previous state or this one. optimizer: a carried finetune
    optimizer's state tensors."""
    from safetensors.torch import save_file

    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tensors.update({f"optimizer.{k}": v.contiguous() for k, v in (optimizer or {}).items()})
    tensors["rng.generator"] = generator.get_state()
    tensors["rng.torch"] = torch.get_rng_state()
    metadata = {SPEC_KEY: json.dumps(model_spec(model)), "bcd_state": json.dumps(state)}
    with atomic_write(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def load_state(path: Path, model: nn.Module, generator: torch.Generator,
               optimizer: Optional["train.CarriedOptimizer"] = None) -> dict:
    """Loads weights, masks and RNG states into model/generator/torch (and a carried finetune optimizer's state into
    `optimizer`); returns the JSON state."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as f:
            state = json.loads((f.metadata() or {})["bcd_state"])
        tensors = load_file(str(path))
    except Exception as err:
        raise FastmaskError(f"BCD state {path} is corrupt or was not written by fastmask ({err}); "
                            "delete it to restart BCD") from err
    if state.get("version") != STATE_VERSION:
        raise FastmaskError(f"BCD state {path} is version {state.get('version')}, written by another fastmask; "
                            f"fastmask {__version__} reads version {STATE_VERSION}: start a new --out, or delete "
                            "it to restart BCD")
    weights = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    device = next(iter(model.state_dict().values())).device
    try:
        model.load_state_dict({k: v.to(device) for k, v in weights.items()}, strict=True)
    except RuntimeError as err:
        raise FastmaskError(f"BCD state {path} was made for another model ({str(err).splitlines()[0]})") from err
    generator.set_state(tensors["rng.generator"])
    torch.set_rng_state(tensors["rng.torch"])
    if optimizer is not None:
        optimizer.load_state_tensors({k[len("optimizer."):]: v for k, v in tensors.items()
                                      if k.startswith("optimizer.")})
    return state


# ---- the driver --------------------------------------------------------------------------------------------------
@dataclass
class BCDResult:
    history: list[dict]
    targets: list[dict]
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class Measured:
    """What a step knows before it chooses: its candidates, the images their estimate trained through, and the
    current model's reference score on the scoring subset."""
    candidates: list[torch.Tensor]
    estimate_images: int
    reference: tuple[float, float]
    standard_error: float


@dataclass
class Choice:
    """The candidate a step takes: its index, whether it is the fallback (none within ADT), its accuracy and loss on
    the scoring subset (NaN when taken unscored), how many candidates were scored and the image-forwards spent."""
    index: int
    fallback: bool
    accuracy: float
    loss: float
    scored: int
    forward_images: int


class BCD:
    """The driver. Training and evaluation come in as callables, so the loop itself knows nothing of datasets:

    finetune(model, step) -> dict with at least "val_acc" (post-finetune validation accuracy, percent);
    target_finetune(model, step) -> the same, run once more when a step lands on a target (None: no such finetune);
    evaluate_target(model) -> dict of metrics saved with a target (val/test accuracy and loss);
    on_step(record, driver), called after a step's state is written (progress, reports; raising stops the run).
    carried: the optimizer `finetune` carries from step to step (finetune.step_schedule continuous), whose state is
    written with the BCD state and restored on resume.

    With a `group` (torchrun), every process runs the loop: the cost estimates are summed over the processes' shares
    of the scoring subset, rank 0's candidates and choice are broadcast, scoring is shared out, and after every step
    the masks' digests must agree. Rank 0 alone writes the state and the targets and calls on_step.
    """

    def __init__(self, model: nn.Module, config: BCDConfig, images: torch.Tensor, labels: torch.Tensor,
                 finetune: Callable[[nn.Module, int], dict], out_dir: str | Path, *, seed: int = 0,
                 evaluate_target: Optional[Callable[[nn.Module], dict]] = None,
                 target_finetune: Optional[Callable[[nn.Module, int], dict]] = None,
                 on_step: Optional[Callable[[dict, "BCD"], None]] = None,
                 log: Callable[[str], None] = print, group: Optional[Group] = None,
                 carried: Optional["train.CarriedOptimizer"] = None):
        self.model = model
        self.carried = carried
        self.config = config
        self.images = images
        self.labels = labels
        self.finetune = finetune
        self.out_dir = Path(out_dir)
        self.evaluate_target = evaluate_target or (lambda m: {})
        self.target_finetune = target_finetune
        self.group = group
        self.is_main = is_main(group)
        self.on_step = on_step
        self.log = log
        self.mask_set = MaskSet(model)
        self.seed = int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)
        self.state_path = self.out_dir / STATE_FILE
        self.history: list[dict] = []
        self.targets_done: list[dict] = []
        self.warned: list[str] = []
        self.done = False
        # The latency model, when removals are weighed by latency or targets are latencies.
        self.pricing = (LatencyPricing.of(model, config.protocol, config.network)
                        if config.cost == "latency" or config.latency_targets else None)

    @property
    def step(self) -> int:
        return len(self.history)

    def fingerprint(self) -> dict:
        """What must match for --resume to continue the same run: every search setting, the seed, and the shape of
        the finetunes (a target finetune or not, one optimizer carried or a fresh one per step)."""
        return {**dataclasses.asdict(self.config), "seed": self.seed,
                "target_finetune": self.target_finetune is not None,
                "step_schedule": "fresh" if self.carried is None else "continuous"}

    def _state(self) -> dict:
        return {"version": STATE_VERSION, "config": self.fingerprint(), "history": self.history,
                "targets": self.targets_done, "warnings": self.warned, "done": self.done}

    def _resume(self) -> None:
        state = load_state(self.state_path, self.model, self.generator, self.carried)
        if state["config"] != self.fingerprint():
            raise FastmaskError(f"BCD state {self.state_path} belongs to another run ({state['config']}); "
                                "use the same settings to resume it, or another out dir")
        self.history, self.targets_done = state["history"], state["targets"]
        self.warned, self.done = state.get("warnings", []), state["done"]
        self.log(f"BCD: resuming after step {self.step} at {self.mask_set.count()} ReLUs")

    def run(self, resume: bool = False) -> BCDResult:
        started = time.perf_counter()
        if self.state_path.exists():
            if not resume:
                raise FastmaskError(f"{self.state_path} already holds a BCD run; pass --resume to continue it")
            self._resume()
        self.config.validate(self.mask_set.count() if not self.history else self.history[0]["budget_before"])
        if self.mask_set.carries_alphas():
            raise FastmaskError("the model still carries SNL alphas; binarize them before BCD")
        if self.config.latency_targets and not self.history:
            self._check_latency_targets()
        while not self.done:
            count = self.mask_set.count()
            if self._finished(count):
                self.done = True
                self._save_state()
                break
            self._one_step(count)
        return BCDResult(self.history, self.targets_done, self.warned, time.perf_counter() - started)

    # ---- targets: ReLU budgets, or predicted latencies -----------------------------------------------------
    def latency(self) -> Optional[float]:
        """The current masks' predicted latency in seconds (None without a latency model)."""
        return None if self.pricing is None else self.pricing.current(self.mask_set)

    def _check_latency_targets(self) -> None:
        start, floor = self.latency(), self.pricing.floor(self.mask_set)
        first, last = self.config.latency_targets[0], self.config.latency_targets[-1]
        where = self.pricing.describe()
        if first >= start:
            raise FastmaskError(f"latency target {first:g}s is at or above the predicted latency BCD starts from "
                                f"({start:.3f}s, {where}); give targets below it")
        if last < floor:
            raise FastmaskError(f"latency target {last:g}s is below what the model costs with no ReLU at all "
                                f"({floor:.3f}s, {where}); give targets above it")

    def _finished(self, count: int) -> bool:
        if self.config.latency_targets:
            return count == 0 or self.latency() <= self.config.latency_targets[-1]
        return count <= int(self.config.targets[-1])

    def _plan(self, count: int) -> tuple[float, int]:
        """(the next target, ReLUs a step removes): a budget target is landed on exactly; a latency target is
        passed by whole steps."""
        if self.config.latency_targets:
            latency = self.latency()
            return next(t for t in self.config.latency_targets if t < latency), min(int(self.config.drc), count)
        return plan_removal(count, self.config.targets, self.config.drc)

    def _landed(self, target: float) -> bool:
        if self.config.latency_targets:
            return self.latency() <= target
        return self.mask_set.count() == target

    def _warn_once_if_noisy(self, reference: tuple[float, float]) -> float:
        standard_error = accuracy_standard_error(reference[0], int(self.labels.shape[0]))
        threshold = NOISE_STANDARD_ERRORS * standard_error
        chooses = int(self.config.rt) > 1  # RT 1 takes its candidate unscored
        if chooses and self.config.criterion == "accuracy" and self.config.adt < threshold and not self.warned:
            message = (f"ADT {self.config.adt} points is below {NOISE_STANDARD_ERRORS:g} standard errors "
                       f"({threshold:.2f} points) of the {self.labels.shape[0]}-image scoring subset: candidates are "
                       "chosen on noise; score on more images (--score-subset 0) or use --criterion loss")
            self.warned.append(message)
            warnings.warn(message, RuntimeWarning, stacklevel=4)
        return standard_error

    # ---- one step: measure, choose, apply, record ------------------------------------------------------------
    def _one_step(self, count: int) -> None:
        step = self.step + 1
        target, remove = self._plan(count)
        last_good = copy.deepcopy(self.model.state_dict())
        t0 = time.perf_counter()
        measured = self._measure(step, remove)
        choice = self._choose(measured)
        t1 = time.perf_counter()
        tuned, target_images = self._apply(measured.candidates[choice.index], step, target, last_good)
        t2 = time.perf_counter()
        self._record(step, count, target, remove, measured, choice, tuned, target_images, (t0, t1, t2))

    def _measure(self, step: int, remove: int) -> Measured:
        """The step's candidates (drawn before scoring, so early stopping never changes what the generator yields
        next) and the reference they are scored against."""
        candidates, estimate_images = self._candidates(remove)
        reference = score_current(self.model, self.images, self.labels, batch_size=self.config.score_batch_size)
        if not math.isfinite(reference[1]):
            raise FastmaskError(f"BCD step {step}: the model's loss on the scoring subset is {reference[1]} (its "
                                "eval-mode outputs are not finite); a polynomial replacement's quadratic terms can "
                                "overflow from site to site at low budgets: use --replacement identity, or lower "
                                "--snl-lr and --finetune-lr")
        return Measured(candidates, estimate_images, reference, self._warn_once_if_noisy(reference))

    def _choose(self, measured: Measured) -> Choice:
        """Scores the candidates (rank 0's choice is every process's); one candidate goes in unscored."""
        if len(measured.candidates) == 1:  # RT 1 (or one subset left): nothing to choose between
            return Choice(0, False, math.nan, math.nan, 0, 0)
        choice = self._score(measured.candidates, measured.reference)
        if self.group is not None:  # rank 0 decides; everyone applies its choice
            index, fallback, accuracy, loss = self.group.broadcast(
                (choice.index, choice.fallback, choice.accuracy, choice.loss))
            choice = dataclasses.replace(choice, index=index, fallback=fallback, accuracy=accuracy, loss=loss)
        return choice

    def _apply(self, chosen: torch.Tensor, step: int, target: int, last_good: dict) -> tuple[dict, int]:
        """Removes the chosen ReLUs and finetunes, once more when the count lands on the target: (the last
        finetune's result with the step's train images, the target finetune's images)."""
        self.mask_set.remove(chosen)
        tuned = self._finetune(self.finetune, step, last_good)
        step_images, target_images = int(tuned.get("train_images", 0)), 0
        if self._landed(target) and self.target_finetune is not None:  # measured after this one
            tuned = self._finetune(self.target_finetune, step, last_good)
            target_images = int(tuned.get("train_images", 0))
        if self.group is not None:
            self.group.check_same(f"masks after BCD step {step}", masks_digest(self.model))
        return {**tuned, "train_images": step_images + target_images}, target_images

    def _record(self, step: int, count: int, target: int, remove: int, measured: Measured, choice: Choice,
                tuned: dict, target_images: int, times: tuple[float, float, float]) -> None:
        """The step's row, the target when the count lands on it, the state file, the log line and on_step."""
        config, reference, n = self.config, measured.reference, int(self.labels.shape[0])
        drop = reference[0] - choice.accuracy if config.criterion == "accuracy" else choice.loss - reference[1]
        budget = self.mask_set.count()
        t0, t1, t2 = times
        record = {
            "step": step, "target": int(target), "budget_before": count, "budget_after": budget,
            "removed": remove, "ref_acc": reference[0], "ref_loss": reference[1],
            "ref_se_points": measured.standard_error,
            "scoring_images": n, "tries_scored": choice.scored, "rt": int(config.rt),
            "accepted_index": choice.index, "accepted_drop": drop, "accepted_acc": choice.accuracy,
            "accepted_loss": choice.loss, "fallback": choice.fallback,
            "val_acc": tuned.get("val_acc"), "val_loss": tuned.get("val_loss"),
            # compute: images pushed forward by the search (reference + candidates), images trained on (the
            # finetunes, plus the informed proposal's forward + backward pass)
            "forward_images": n + choice.forward_images,
            "train_images": int(tuned["train_images"]) + measured.estimate_images,
            "target_finetune_images": target_images,
            "seconds_scoring": t1 - t0, "seconds_finetune": t2 - t1, "seconds": t2 - t0,
        }
        latency = self.latency()
        if latency is not None:
            record["latency_seconds"] = latency
            record["sites"] = sum(1 for k in kept_per_site(self.mask_set) if k > 0)
        self.history.append(record)
        if self.config.latency_targets:
            reached = {t["latency_target"] for t in self.targets_done}
            for goal in self.config.latency_targets:
                if goal not in reached and latency <= goal:
                    self._save_target(budget, latency_target=goal)
        elif budget == target:
            self._save_target(target)
        self._save_state()
        val = "n/a" if record["val_acc"] is None else f"{record['val_acc']:.2f}%"
        picked = "one candidate, taken unscored" if not choice.scored else \
            (f"{'fallback' if choice.fallback else 'accepted'} drop {drop:+.3f} after {choice.scored}/"
             f"{len(measured.candidates)} tries")
        goal = f"{target:g}s" if self.config.latency_targets else str(target)
        predicted = "" if latency is None else f", predicted {latency:.3f}s over {record['sites']} sites"
        self.log(f"BCD step {step}: {count} -> {budget} ReLUs{predicted} (target {goal}); reference "
                 f"{reference[0]:.2f}% (+-{measured.standard_error:.2f}); {picked}; val {val}; {t1 - t0:.1f}s "
                 f"scoring + {t2 - t1:.1f}s finetune")
        if self.on_step is not None and self.is_main:
            self.on_step(record, self)

    def _save_state(self) -> None:
        if self.is_main:
            save_state(self.state_path, self.model, self.generator, self._state(),
                       None if self.carried is None else self.carried.state_tensors())

    def _finetune(self, finetune: Callable[[nn.Module, int], dict], step: int, last_good: dict) -> dict:
        try:
            return finetune(self.model, step) or {}
        except FastmaskError as err:  # train.TrainingDiverged (NaN/inf loss): go back to the last saved state
            self.model.load_state_dict(last_good)
            raise FastmaskError(f"BCD step {step}: finetune failed ({err}); the model is back at its state after "
                                f"step {step - 1} (saved in {self.state_path}); lower the finetune lr and --resume"
                                ) from err

    def _candidates(self, remove: int) -> tuple[list[torch.Tensor], int]:
        """(RT candidates, images the proposal trained through); with --cost latency, drawn by cost per second
        saved, with a site-emptying candidate added and all ordered by the latency they save (fastmask.search.
        pricing)."""
        config = self.config
        weigh = config.cost == "latency"
        costs, images = None, 0
        if config.proposal == "uniform":
            candidates = [self.mask_set.sample(remove, self.generator) for _ in range(int(config.rt))]
        else:
            # Estimated after every finetune (each step starts after one), on the scoring subset.
            part = share(int(self.labels.shape[0]), self.group)
            costs = removal_costs(self.model, self.images[part], self.labels[part],
                                  batch_size=config.score_batch_size)
            if self.group is not None:  # sums over the processes' shares; +inf (absent) stays +inf
                costs = self.group.all_reduce_sum_(costs)
            drawn = self.pricing.weighted(costs, self.mask_set) if weigh else costs
            candidates = propose(drawn, remove, int(config.rt), self.generator, pool=config.pool,
                                 temperature=config.temperature)
            images = int(self.labels.shape[0])
        if weigh:
            emptying = self.pricing.emptying(costs, self.mask_set, remove)
            if emptying is not None and not any(torch.equal(emptying, c) for c in candidates):
                candidates.insert(0, emptying)
            savings = [self.pricing.saving(c, self.mask_set) for c in candidates]
            order = sorted(range(len(candidates)), key=lambda i: (-savings[i], i))
            candidates = [candidates[i] for i in order]
        if self.group is not None:
            candidates = self.group.broadcast(candidates)
        return candidates, images

    def _score(self, candidates: list[torch.Tensor], reference: tuple[float, float]) -> Choice:
        """The chosen candidate by the configured rule (race, or the paper's exact first-under-ADT); with --cost
        latency, among the scored ones, the one within ADT that saves the most (else the least drop per second
        saved)."""
        config, n = self.config, int(self.labels.shape[0])
        weigh = config.cost == "latency"
        if config.scoring == "race":
            result = race(self.model, candidates, self.images, self.labels, criterion=config.criterion,
                          reference=reference, adt=config.adt, eta=config.race_eta,
                          batch_size=config.score_batch_size, shuffle_seed=self.seed, group=self.group)
            if not weigh:
                acc, loss = result.best_scores
                return Choice(result.best, result.accepted is None, acc, loss, len(candidates),
                              result.forward_images)
            drops = [reference[0] - a if config.criterion == "accuracy" else loss - reference[1]
                     for a, loss in zip(result.accuracy, result.loss)]
            savings = [self.pricing.saving(candidates[i], self.mask_set) for i in result.survivors]
            position, fallback = choose_by_saving(drops, savings, config.adt)
            return Choice(result.survivors[position], fallback, result.accuracy[position], result.loss[position],
                          len(candidates), result.forward_images)
        scores = score_hypotheses(self.model, candidates, self.images, self.labels, reference=reference,
                                  adt=config.adt, criterion=config.criterion, batch_size=config.score_batch_size,
                                  group=self.group)
        if weigh:  # candidates come largest saving first, so the first within ADT is the best one
            drops = [float(d) for d in scores.drop(reference, config.criterion)]
            savings = [self.pricing.saving(c, self.mask_set) for c in candidates]
            index, fallback = choose_by_saving(drops, savings, config.adt)
        else:
            index, fallback = choose(scores, reference, config.criterion)
        return Choice(index, fallback, float(scores.accuracy[index]), float(scores.loss[index]), int(scores.scored),
                      int(scores.scored) * n)

    def compute(self) -> dict:
        """Images the search has pushed forward and trained on so far (every step of this run)."""
        return images_spent(self.history)

    def _save_target(self, target: int, latency_target: Optional[float] = None) -> None:
        """Saves the model at a target: a ReLU budget (target), or a latency target passed at `target` ReLUs."""
        directory = self.out_dir / "targets" / str(target)
        metrics = dict(self.evaluate_target(self.model))
        from .. import cost  # the predicted private-inference cost, taken while the target's model is in memory

        entry = {"budget": int(target), "step": self.step, **metrics, **self.compute(),
                 "per_site": self.mask_set.per_site(), "cost": cost.summary(cost.workload(self.model))}
        if self.pricing is not None:
            entry.update({"latency_seconds": self.latency(), "latency_model": self.pricing.describe()})
        if latency_target is not None:
            entry["latency_target"] = latency_target
        self.targets_done.append(entry)
        if not self.is_main:
            return
        save_model(self.model, directory / "model.safetensors", extra={"relu_count": int(target), **metrics})
        self.mask_set.save(directory / "masks.safetensors")
        self.log(f"BCD: target {target} reached at step {self.step}: "
                 + ", ".join(f"{k} {v:.2f}" for k, v in metrics.items() if isinstance(v, float)))


# ---- the whole thing on a fastmask dataset -----------------------------------------------------------------------
def run_bcd(model: nn.Module, dataset, config: BCDConfig, device, out_dir: str | Path, *, seed: int = 0,
            finetune: Optional[FinetuneConfig] = None, teacher: Optional[nn.Module] = None, resume: bool = False,
            on_step=None, progress: bool = True, log: Callable[[str], None] = print,
            group: Optional[Group] = None) -> BCDResult:
    """BCD on a fastmask.data.Dataset: scores on data.scoring_subset, finetunes with train.train (a new seed per
    step, so a resumed run repeats the same shuffles), evaluates each target on val and test. finetune (default:
    FinetuneConfig's defaults, as the CLI's): the recipe of every step's finetune and of the target finetune; with
    step_schedule "continuous" the step finetunes share one optimizer at a constant lr, the target finetune is
    always fresh."""
    from .. import data, train

    finetune = FinetuneConfig() if finetune is None else finetune
    recipe = train.finetune_recipe(finetune, model_spec(model)["arch"], dataset.name)
    model.to(device)
    images, labels = data.scoring_subset(dataset, config.score_subset, device, seed=seed)
    carried = train.CarriedOptimizer() if finetune.step_schedule == "continuous" else None

    def finetune_step(m: nn.Module, step: int, epochs: Optional[int] = None, max_steps=finetune.max_steps,
                      carry: Optional[train.CarriedOptimizer] = carried) -> dict:
        step_config = dataclasses.replace(recipe, seed=int(seed) * 1_000_003 + step,
                                          epochs=recipe.epochs if epochs is None else epochs,
                                          lr_schedule="cosine" if carry is None else "constant")
        rows = train.train(m, dataset, step_config, device, teacher=teacher, progress=progress, max_steps=max_steps,
                           group=group, carried=carry)
        last = rows[-1]  # train() validates after every epoch
        return {"val_acc": float(last["val_acc"]), "val_loss": float(last["val_loss"]),
                "train_images": int(last["images"])}

    def target_finetune(m: nn.Module, step: int) -> dict:  # whole epochs, another shuffle than the step's
        return finetune_step(m, step + 500_000, epochs=finetune.target_epochs, max_steps=None, carry=None)

    def evaluate_target(m: nn.Module) -> dict:
        val_acc, val_loss = train.evaluate(m, dataset.val_x, dataset.val_y, dataset, device)
        test_acc, test_loss = train.evaluate(m, dataset.test_x, dataset.test_y, dataset, device)
        return {"val_acc": val_acc, "val_loss": val_loss, "test_acc": test_acc, "test_loss": test_loss}

    driver = BCD(model, config, images, labels, finetune_step, out_dir, seed=seed, evaluate_target=evaluate_target,
                 target_finetune=target_finetune if finetune.target_epochs > 0 else None, on_step=on_step, log=log,
                 group=group, carried=carried)
    return driver.run(resume=resume)
