"""Fidelity: BCD's searches against SNL (and the paper's Algorithm 2) at low ReLU budgets, equal compute.

    python bench/fidelity.py --data cifar10_subset.npz --scale small --seeds 0,1,2     # CPU: hours
    python bench/fidelity.py --data cifar10_subset.npz --scale smoke                   # minutes: checks the script

Per seed, fastmask.pipeline runs (nothing here re-implements a stage):
  1. identity replacement, --method both: baseline -> SNL to B_ref -> from that SAME model, the "default" arm:
     fastmask's first default search (informed candidates, racing, a fresh SGD finetune per step; ARMS_DEFAULTS)
     through every target, and SNL straight to each target with the same compute (images trained on + images
     pushed forward; SNL's alpha phase counted);
  2. the paper's Algorithm 2 (uniform candidates, exact scoring) from run 1's SNL@B_ref model and teacher;
     "default-absolute": run 1's BCD again with the absolute estimate (the default since), its SNL rows run 1's;
  2b. "finetuned": run 1 again from its SNL@B_ref model, with a finetune whenever BCD lands on a target
     (TARGET_FINETUNE_EPOCHS), and SNL with the same (larger) compute;
  2c. "lean": as 2b with a cheaper search (lean_search: twice the DRC, half the candidates); "lean-lr": the same
     with every finetune of both methods at LEAN_FINETUNE_LR; "lean-adam": with every finetune on SNL's alpha-phase
     optimizer (LEAN_ADAM); "settled": lean-lr from an SNL@B_ref model finetuned longer (SNL to B_ref redone from
     run 1's baseline, SETTLED_SNL_FINETUNE_EPOCHS); "settled-adam": lean-adam from the settled arm's start;
     "gradual": settled-adam with smaller steps, fewer forwards and more training between them (gradual_search);
     "gradual-absolute": gradual with informed candidates ranked by the absolute estimate (bcd.estimate);
     "continuous": gradual-absolute with one optimizer carried through the step finetunes at a constant lr
     (finetune.step_schedule), as SNL's alpha phase trains through its removals; "continuous-pool": continuous with
     candidates drawn from the 1.5 x DRC cheapest ReLUs instead of 4 x DRC (CONTINUOUS_POOL); "continuous-loss":
     continuous with its two candidates told apart by their loss on the scoring subset instead of their accuracy
     (bcd.criterion loss); "continuous-geometric": continuous removing the same share of what is left at every
     step (bcd.drc_fraction) instead of a fixed 300, so the leg to 1,500 takes as many steps as the leg to 3,000
     (geometric_search); "continuous-quota": continuous with each site giving its share of every step's removals,
     in proportion to its present ReLUs (bcd.quota), so the sites keep the start's shares; "continuous-fade":
     continuous with each step's chosen ReLUs fading to the identity over its finetune (bcd.removal fade), as SNL's
     alphas fall while the weights train; "continuous-summed": continuous with the estimate that draws its
     candidates summed over every batch of the finetunes as well as the scoring subset (bcd.estimate_from), as SNL's
     alphas integrate their gradient over the whole alpha phase; "continuous-channels": continuous with each ReLU's
     estimated cost weighed by its channel's ReLU count (bcd.concentrate), as SNL keeps its ReLUs in fewer channels;
     "continuous-summed-signed": continuous-summed with the signed estimate, the sum an SNL alpha's gradient takes;
     "continuous-restore": continuous putting back, every step, up to a third of its DRC (RESTORE_SHARE) of the
     absent ReLUs whose signed estimate says the loss falls most, and removing as many more (bcd.restore), as SNL's
     alphas can grow back; "continuous-direct": continuous from B_ref straight to the last target, as SNL goes,
     the images of the target finetunes on the way spent on the finetunes between removals (direct_search);
     "continuous-unscored": continuous with one candidate per step taken unscored (RT 1), the race's forwards
     spent on the step's finetune (unscored_search); "continuous-combined": the last three together;
     "continuous-direct-final" and "continuous-direct-steps": continuous-direct with all the images of the target
     finetunes on the way on the last mask's finetune (20 epochs at the small scale, as SNL trains its last mask
     most) or with half its target finetune moved to the finetunes between removals (5 epochs);
     "continuous-direct-fine" and "continuous-direct-finer": continuous-direct in steps of a half and a quarter of
     the DRC, each step's one candidate taken unscored; "continuous-direct-fine-first": continuous-direct-fine
     straight to the first target (straight_search); "continuous-direct-greedy" and
     "continuous-direct-greedy-first": continuous-direct-fine and -fine-first removing the cheapest ReLUs by the
     estimate (bcd.pool GREEDY_POOL) instead of a draw from the 4 x DRC cheapest; "continuous-direct-greedy-summed":
     continuous-direct-greedy with the estimate summed over the finetunes' batches too (bcd.estimate_from). These
     twenty-two spend, to every target they reach, no more images than gradual does, from its start and seed: their
     SNL rows are gradual's SNL run when the seed has one (SNL_FROM; checked), else their own;
  2d. "settled-polynomial": settled with the polynomial replacement (SNL to B_ref from run 1's baseline with the
     polynomial, then settled's longer finetune); "continuous-polynomial": continuous from that start with the
     polynomial, --method both (its own SNL side, with the polynomial too);
  3. polynomial replacement, --method both, from run 1's baseline (SNL to B_ref is redone with the polynomial).
An arm asked for alone runs only the start it needs from the runs above it (run 1's baseline, settled's or
settled-polynomial's SNL@B_ref model), not their searches. Test accuracy is measured once per method and target;
nothing is chosen on it. The continuous arm's settings are fastmask's defaults today (where they do not depend on
the scale: DRC, scoring subset and finetune length are the scale's). Writes fidelity_<scale>.md, .json and .png
(or --name's) into --out; each run's own folder (report, models, steps) stays beside them.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

if TYPE_CHECKING:
    import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fastmask import report  # noqa: E402
from fastmask.config import resolve, validate  # noqa: E402
from fastmask.pipeline import Pipeline, run_dataset  # noqa: E402
from fastmask.search.bcd import plan_removal  # noqa: E402
from fastmask.search.racing import default_first_slice  # noqa: E402
from fastmask.train import TrainConfig  # noqa: E402

# Run settings per scale, as fastmask.config paths. finetune.max_steps is per BCD step (of BATCH images).
BATCH = TrainConfig.batch_size
SCALES = {
    # a few minutes: checks that the script runs end to end, numbers mean nothing
    "smoke": {"model.width": 8, "baseline.epochs": 1, "snl.ref_budget": 8000, "bcd.targets": [7000, 6000],
              "snl.epochs": 2, "snl.target_epochs": 1, "snl.lambda0": 3e-3, "snl.finetune_epochs": 0,
              "bcd.drc": 500, "bcd.rt": 4, "bcd.adt": 0.3, "bcd.score_subset": 256, "finetune.epochs": 1,
              "finetune.max_steps": 4},
    # the calibration scale: resnet18 width 16 (122,880 ReLUs), B_ref 6,000, targets 3,000 and 1,500
    "small": {"model.width": 16, "baseline.epochs": 15, "snl.ref_budget": 6000, "bcd.targets": [3000, 1500],
              "snl.epochs": 20, "snl.target_epochs": 8, "snl.lambda0": 1.1e-3, "snl.finetune_epochs": 2,
              "bcd.drc": 300, "bcd.rt": 8, "bcd.adt": 0.3, "bcd.score_subset": 2048, "finetune.epochs": 1,
              "finetune.max_steps": 18},
    # paper-like search settings (DRC 100, RT 50, whole-train scoring, an epoch of finetune per step): a GPU's work
    "full": {"model.width": 16, "baseline.epochs": 60, "snl.ref_budget": 6000, "bcd.targets": [3000, 1500],
             "snl.epochs": 60, "snl.target_epochs": 60, "snl.lambda0": 1.1e-3, "snl.finetune_epochs": 10,
             "bcd.drc": 100, "bcd.rt": 50, "bcd.adt": 0.3, "bcd.score_subset": 0, "finetune.epochs": 1},
}
PAPER_SEARCH = {"bcd.proposal": "uniform", "bcd.scoring": "exact"}
# fastmask's defaults when these arms were set up (the continuous arm's settings are the defaults since): every run
# here starts from them, so each arm's settings, and its rows, stay what they were; an arm's own settings override
# them. The finetune's None is the paper's recipe (SGD 1e-3 for resnet18).
ARMS_DEFAULTS = {"bcd.rt": 50, "finetune.optimizer": None, "finetune.lr": None, "finetune.step_schedule": "fresh",
                 "finetune.target_epochs": 0}
# The arms before gradual-absolute (but default-absolute) rank informed candidates by the signed estimate, the
# default when they ran.
SIGNED = {"bcd.estimate": "signed"}
# The "finetuned" arm: the first default search plus this many finetune epochs whenever it lands on a target.
TARGET_FINETUNE_EPOCHS = {"smoke": 1, "small": 10, "full": 20}
ARMS = ("default", "paper", "default-absolute", "finetuned", "lean", "lean-lr", "lean-adam", "settled", "settled-adam",
        "gradual", "gradual-absolute", "continuous", "continuous-pool", "continuous-loss", "continuous-geometric",
        "continuous-quota", "continuous-fade", "continuous-summed", "continuous-summed-signed", "continuous-channels",
        "continuous-restore", "continuous-direct", "continuous-unscored", "continuous-combined",
        "continuous-direct-final", "continuous-direct-steps", "continuous-direct-fine", "continuous-direct-finer",
        "continuous-direct-fine-first", "continuous-direct-greedy", "continuous-direct-greedy-first",
        "continuous-direct-greedy-summed", "settled-polynomial",
        "continuous-polynomial", "polynomial")
# The "lean-lr" arm: lean with every finetune (BCD's and SNL's alike) at this SGD lr instead of the paper's 1e-3, a
# tenth of the baseline's 0.1 (chosen before any run, not on any measurement).
LEAN_FINETUNE_LR = 1e-2
# The "lean-adam" arm: lean with every finetune (both methods) on the optimizer and lr of SNL's alpha phase.
LEAN_ADAM = {"finetune.optimizer": "adam", "finetune.lr": 1e-3}
# The "settled" arm: lean-lr from an SNL@B_ref model whose own finetune ran this many epochs (at lean-lr's lr) instead
# of the scale's few, so both methods start from a model that has recovered from SNL's binarization.
SETTLED_SNL_FINETUNE_EPOCHS = {"smoke": 1, "small": 12, "full": 20}
# A training image costs about this many forwards (forward + backward = 3; the teacher's forward makes it 4): only for
# the table's train-equivalent column, never for the equal-compute rule, which counts image passes.
TRAIN_PASS_IN_FORWARDS = 3.0


def lean_search(scale: dict) -> dict:
    """The "lean" arm's search: twice the DRC (half the steps) and half the candidates of the scale's, so the search
    spends about what SNL's alpha phase does and the training left is about equal on both sides."""
    return {"bcd.drc": 2 * scale["bcd.drc"], "bcd.rt": max(2, scale["bcd.rt"] // 2)}


def gradual_search(scale: dict) -> dict:
    """The "gradual" arm's search: the scale's DRC (twice lean's steps), two candidates scored on half the subset,
    and twice the finetune steps between removals, so compute moves from scoring to training while ReLUs go, as in
    SNL's alpha phase, which trains the weights throughout its removal."""
    search = {"bcd.drc": scale["bcd.drc"], "bcd.rt": 2, "bcd.score_subset": scale["bcd.score_subset"] // 2}
    if scale.get("finetune.max_steps"):
        search["finetune.max_steps"] = 2 * scale["finetune.max_steps"]
    return search


def geometric_search(scale: dict) -> dict:
    """The "continuous-geometric" arm's search: gradual's, removing GEOMETRIC_FRACTION of the ReLUs per step, with as
    many finetune steps per BCD step as gradual's images to every target allow (a step trains on its finetune
    batches and on the scoring subset, for the estimate): small scale, 14 BCD steps of 39 instead of 15 of 36."""
    gradual = {**scale, **gradual_search(scale)}
    search = {"bcd.drc_fraction": GEOMETRIC_FRACTION}
    if not gradual.get("finetune.max_steps"):  # whole epochs per step: fewer steps spend fewer images
        return search
    targets = gradual["bcd.targets"]

    def steps_to_each_target(drc: int, fraction: float) -> list[int]:
        count, steps, taken = gradual["snl.ref_budget"], [], 0
        while count > targets[-1]:
            target, remove = plan_removal(count, targets, drc, fraction)
            count, taken = count - remove, taken + 1
            if count == target:
                steps.append(taken)
        return steps

    estimate = gradual["bcd.score_subset"]
    per_step = gradual["finetune.max_steps"] * BATCH + estimate
    fixed, geometric = steps_to_each_target(gradual["bcd.drc"], 0.0), steps_to_each_target(0, GEOMETRIC_FRACTION)
    search["finetune.max_steps"] = min((f * per_step // g - estimate) // BATCH for f, g in zip(fixed, geometric))
    return search


def step_finetune_images(settings: dict, train_size: int) -> int:
    """Images one BCD step's finetune trains on: its steps' batches, at most its epochs of the train split."""
    return min(BATCH * settings.get("finetune.max_steps", math.inf), train_size * settings["finetune.epochs"])


def race_images(settings: dict, train_size: int) -> int:
    """Image-forwards gradual's race spends per step on its two candidates (at the small scale both are scored on
    the whole 1,024-image subset: 2,048)."""
    subset = settings["bcd.score_subset"] or train_size
    first = default_first_slice(2, subset, 2)  # two candidates, eta 2: one round on the slice, then the whole subset
    return 2 * first + subset if first < subset else 2 * subset


def straight_search(scale_name: str, train_size: int, *, rt: int = 2, drc: Optional[int] = None,
                    target_epochs: Optional[int] = None, target: int = -1) -> dict:
    """A search from B_ref straight to one of the scale's targets (the last by default; as SNL's rows go) that spends
    what continuous spends to it, continuous's target finetunes on the way included, with rt candidates (1: taken
    unscored, no race), drc ReLUs per step (default gradual's) and target_epochs of target finetune (default the
    scale's): the finetune steps between removals get the images left. A step trains on its finetune and on the
    scoring subset (the estimate) and pushes the subset forward (the reference) besides its race."""
    if rt not in (1, 2):
        raise ValueError("the race's images are counted for one or two candidates")
    gradual = {**SCALES[scale_name], **gradual_search(SCALES[scale_name])}
    targets, subset = gradual["bcd.targets"], gradual["bcd.score_subset"] or train_size
    reached = targets[: target % len(targets) + 1]  # continuous's targets up to this one
    epochs = TARGET_FINETUNE_EPOCHS[scale_name] if target_epochs is None else target_epochs
    drc = drc or gradual["bcd.drc"]

    def besides_finetune(candidates: int) -> int:
        return 2 * subset + (race_images(gradual, train_size) if candidates == 2 else 0)

    continuous_steps = math.ceil((gradual["snl.ref_budget"] - reached[-1]) / gradual["bcd.drc"])
    continuous = (continuous_steps * (step_finetune_images(gradual, train_size) + besides_finetune(2))
                  + len(reached) * TARGET_FINETUNE_EPOCHS[scale_name] * train_size)
    steps = math.ceil((gradual["snl.ref_budget"] - reached[-1]) / drc)
    max_steps = (continuous - steps * besides_finetune(rt) - epochs * train_size) // (steps * BATCH)
    if max_steps < 1:
        raise ValueError(f"{steps} steps of {drc} ReLUs leave no finetune step between removals at the {scale_name} "
                         f"scale with {train_size} train images")
    return {"bcd.targets": [reached[-1]], "bcd.drc": drc, "bcd.rt": rt, "finetune.max_steps": max_steps,
            "finetune.epochs": math.ceil(max_steps * BATCH / train_size), "finetune.target_epochs": epochs}


def direct_search(scale_name: str, train_size: int, unscored: bool = False) -> dict:
    """The "continuous-direct" arm's search: gradual's, from B_ref straight to the scale's last target, as SNL's rows
    go, with the images the target finetunes on the way (continuous's at 3,000 on its way to 1,500) spent on the
    finetunes between removals instead: small scale, 15 BCD steps of 82 finetune steps instead of 36 and one target
    finetune, so it spends no more images than continuous to the last target. unscored: one candidate per step
    (RT 1), the race's forwards spent on the finetunes too (98 steps)."""
    return straight_search(scale_name, train_size, rt=1 if unscored else 2)


def unscored_search(scale_name: str, train_size: int) -> dict:
    """The "continuous-unscored" arm's search: gradual's with one candidate per step, taken unscored (RT 1), and the
    race's forwards spent on that step's finetune instead: small scale, 52 finetune steps per BCD step instead of
    36."""
    gradual = {**SCALES[scale_name], **gradual_search(SCALES[scale_name])}
    max_steps = (step_finetune_images(gradual, train_size) + race_images(gradual, train_size)) // BATCH
    return {"bcd.rt": 1, "finetune.max_steps": max_steps, "finetune.epochs": math.ceil(max_steps * BATCH / train_size)}


# Arms that start from the settled arm's SNL@B_ref model.
SETTLED_STARTS = ("settled-adam", "gradual", "gradual-absolute", "continuous", "continuous-pool", "continuous-loss",
                  "continuous-geometric", "continuous-quota", "continuous-fade", "continuous-summed",
                  "continuous-summed-signed", "continuous-channels", "continuous-restore", "continuous-direct",
                  "continuous-unscored", "continuous-combined", "continuous-direct-final", "continuous-direct-steps",
                  "continuous-direct-fine", "continuous-direct-finer", "continuous-direct-fine-first",
                  "continuous-direct-greedy", "continuous-direct-greedy-first", "continuous-direct-greedy-summed")
# The arms whose SNL@B_ref model others start from, and those others: asked for alone, these make only that start.
STARTS = {"settled": SETTLED_STARTS, "settled-polynomial": ("continuous-polynomial",)}
# Arms that need only run 1's baseline: the starts above (they redo SNL to B_ref from it), the arms on them, and
# polynomial.
FROM_BASELINE = (*STARTS, *(arm for arms in STARTS.values() for arm in arms), "polynomial")
# Arms whose SNL side is another arm's SNL run: the same start, seed and SNL settings, and BCD spends no more train
# + forward images to any target it reaches (checked by shared_snl_rows), so SNL with equal compute would repeat
# that run.
SNL_FROM = {"gradual-absolute": "gradual", "continuous": "gradual", "continuous-pool": "gradual",
            "continuous-loss": "gradual", "continuous-geometric": "gradual", "continuous-quota": "gradual",
            "continuous-fade": "gradual", "continuous-summed": "gradual",
            "continuous-summed-signed": "gradual", "continuous-channels": "gradual",
            "continuous-restore": "gradual", "continuous-direct": "gradual", "continuous-unscored": "gradual",
            "continuous-combined": "gradual", "continuous-direct-final": "gradual",
            "continuous-direct-steps": "gradual", "continuous-direct-fine": "gradual",
            "continuous-direct-finer": "gradual", "continuous-direct-fine-first": "gradual",
            "continuous-direct-greedy": "gradual", "continuous-direct-greedy-first": "gradual",
            "continuous-direct-greedy-summed": "gradual"}
# The "continuous-pool" arm's pool (bcd.pool, a multiple of DRC): the default 4 x 300 is two thirds of the 1,800
# ReLUs left before the last step to 1,500, so its candidates are nearly uniform draws there (fixed before its run).
CONTINUOUS_POOL = 1.5
# The "continuous-geometric" arm's share of the ReLUs removed per step (fixed before its run): at the small scale it
# cuts 6,000 -> 3,000 -> 1,500 into 7 + 7 steps (continuous: 10 + 5, the last 300 being 17% of the 1,800 left).
GEOMETRIC_FRACTION = 0.1
# The "continuous-restore" arm's restores per step, a share of DRC (fixed before its run): 100 of every step's 300
# go back, 400 come out.
RESTORE_SHARE = 1 / 3
# The "continuous-direct-greedy" arms' pool (fixed before their runs): a step taken unscored has no use for a
# sample's spread, so it removes the cheapest DRC (the pool grows to DRC + 1 so two candidates could differ).
GREEDY_POOL = 1.0


def unless_too_fine(settings: Callable[[], dict]) -> "dict | ValueError":
    """An arm's settings, or why its steps leave no finetune at this scale (raised only when the arm is asked for)."""
    try:
        return settings()
    except ValueError as too_fine:
        return too_fine


def lean_arms(scale: str, root: Path, train_size: int) -> "dict[str, dict | ValueError]":
    """The lean search's arms: settings each adds (on top of run 1's SNL@B_ref model and teacher); train_size: the
    train split's images (for the arms that turn images into finetune steps)."""
    baseline = str(root / "identity" / "baseline" / "model.safetensors")
    settled_adam = {**LEAN_ADAM, "model.checkpoint": str(root / "settled" / "snl" / "model.safetensors")}
    gradual = {**settled_adam, **gradual_search(SCALES[scale])}
    gradual_absolute = {**gradual, "bcd.estimate": "absolute"}
    continuous = {**gradual_absolute, "finetune.step_schedule": "continuous"}
    settled = {"finetune.lr": LEAN_FINETUNE_LR, "model.checkpoint": baseline,
               "snl.finetune_epochs": SETTLED_SNL_FINETUNE_EPOCHS[scale]}
    # continuous-direct in steps of half its ReLUs, one candidate each, taken unscored: to the last target and the first
    fine, fine_first = ({**continuous, **straight_search(scale, train_size, rt=1, drc=SCALES[scale]["bcd.drc"] // 2,
                                                         target=target)} for target in (-1, 0))
    greedy = {**fine, "bcd.pool": GREEDY_POOL}
    return {"lean": {}, "lean-lr": {"finetune.lr": LEAN_FINETUNE_LR}, "lean-adam": LEAN_ADAM,
            # SNL to B_ref again from run 1's baseline (the same alpha phase), then a longer finetune
            "settled": settled,
            # lean-adam from the settled arm's SNL@B_ref model (main runs settled first, and whenever it is asked for)
            "settled-adam": settled_adam,
            "gradual": gradual,
            # gradual with the absolute estimate: its cheapest ReLUs lie closer to where SNL removes them (per site)
            "gradual-absolute": gradual_absolute,
            # gradual-absolute training through its removals with one optimizer (no restart, no decay per step)
            "continuous": continuous,
            "continuous-pool": {**continuous, "bcd.pool": CONTINUOUS_POOL},
            # continuous choosing between its candidates by the scoring subset's loss: with 2 candidates on 1,024
            # images both are scored on every image and the pick is the accuracy's, whose standard error (1.5
            # points) is above the candidates' difference; the loss is continuous. ADT then only names fallbacks.
            "continuous-loss": {**continuous, "bcd.criterion": "loss"},
            "continuous-geometric": {**continuous, **geometric_search(SCALES[scale])},
            # continuous with per-site quotas, set because the estimate alone moves the sites' shares towards the
            # early layers (seed 0: continuous's mask at 3,000 keeps 361 ReLUs in layer1 against SNL's 229, 299 in
            # the last site against 426); with a quota the sites keep the SNL start's shares. Measured: SNL does not
            # keep them either, and the quota's mask lies further from SNL's (bench/FIDELITY.md)
            "continuous-quota": {**continuous, "bcd.quota": "proportional"},
            # continuous removing each step's ReLUs gradually over its finetune instead of all at once before it
            "continuous-fade": {**continuous, "bcd.removal": "fade"},
            # continuous with candidates drawn on an estimate over 5x the images (the finetune's 4,608 per step
            # besides the subset's 1,024), taken from the finetune's own backward: no image more than continuous
            "continuous-summed": {**continuous, "bcd.estimate_from": "subset+finetune"},
            # the signed sum is what an SNL alpha's gradient integrates; one pass over the subset made it too noisy
            # (per-image effects of both signs cancel: gradual against gradual-absolute), summed over the
            # finetunes' batches it has about 5x the images per step
            "continuous-summed-signed": {**continuous, "bcd.estimate_from": "subset+finetune",
                                         "bcd.estimate": "signed"},
            # continuous gathering its ReLUs in fewer channels: SNL's masks in continuous's runs use 10-15% fewer
            # channels than BCD's at both budgets and every seed (a count on the masks, no accuracy involved)
            "continuous-channels": {**continuous, "bcd.concentrate": "channels"},
            # continuous with swaps: SNL's alphas can grow back while its weights train, BCD's removals were final.
            # Eight variants that only chose the removals differently did not move BCD (bench/FIDELITY.md)
            "continuous-restore": {**continuous, "bcd.restore": RESTORE_SHARE},
            # continuous from B_ref straight to the last target, as SNL goes: on the way to 1,500 continuous spends
            # 90K images finetuning its 3,000 model, which then loses half its ReLUs; here they train through the
            # removals
            "continuous-direct": {**continuous, **direct_search(scale, train_size)},
            # continuous without scoring: two candidates on 1,024 images are told apart below the accuracy's noise
            # (continuous-loss), so their forwards train instead
            "continuous-unscored": {**continuous, **unscored_search(scale, train_size)},
            # the three above together, set after they ran, on validation accuracy (each moved it up at 1,500)
            "continuous-combined": {**continuous, **direct_search(scale, train_size, unscored=True),
                                    "bcd.restore": RESTORE_SHARE},
            # continuous-direct's images split otherwise between the training through the removals and the
            # finetune of the last mask. SNL trains its last mask on 26.5 of its 34.5 epochs to 1,500 (its alpha
            # phase ran 8), continuous-direct on 10: all the target finetunes' images on the last mask (continuous's
            # 36 finetune steps per BCD step, about what SNL's alpha phase trains on), and half of its own moved to
            # the finetunes between removals
            "continuous-direct-final": {**continuous, **straight_search(
                scale, train_size, target_epochs=len(SCALES[scale]["bcd.targets"]) * TARGET_FINETUNE_EPOCHS[scale])},
            "continuous-direct-steps": {**continuous, **straight_search(
                scale, train_size, target_epochs=TARGET_FINETUNE_EPOCHS[scale] // 2)},
            # continuous-direct in steps of half the ReLUs, as SNL's alphas fall a little at a time, each taken
            # unscored so the steps keep their training (two candidates' scores bought nothing: continuous-unscored)
            "continuous-direct-fine": fine,
            # set after the three above, on validation (continuous-direct-fine was the only one not under
            # continuous-direct): half its DRC again (a quarter of continuous's), and its settings straight to the
            # first target (3,000 at the small scale), for a straight run's row there
            "continuous-direct-finer": unless_too_fine(lambda: {**continuous, **straight_search(
                scale, train_size, rt=1, drc=SCALES[scale]["bcd.drc"] // 4)}),
            "continuous-direct-fine-first": fine_first,
            # continuous-direct-fine and -fine-first removing the estimate's cheapest instead of a draw from the
            # 4 x DRC cheapest: with one candidate, unscored, sampling only adds removals the estimate rates dearer
            "continuous-direct-greedy": greedy,
            "continuous-direct-greedy-first": {**fine_first, "bcd.pool": GREEDY_POOL},
            # greedy removals follow the estimate exactly, so its noise goes straight into them: summed over the
            # step's finetune batches too (41 x 128 images besides the subset's 1,024, no image more), as in
            # continuous-summed (whose sampled, scored candidates did not need it)
            "continuous-direct-greedy-summed": {**greedy, "bcd.estimate_from": "subset+finetune"},
            # settled's start with the polynomial replacement (fitted on the baseline, trained in SNL's alpha phase
            # and finetune), and continuous from it with the polynomial: both methods keep the polynomial
            "settled-polynomial": {**settled, "replacement": "polynomial"},
            "continuous-polynomial": {**continuous, "replacement": "polynomial",
                                      "model.checkpoint": str(root / "settled-polynomial" / "snl" /
                                                              "model.safetensors")}}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="an .npz dataset (x_train, y_train, x_test, y_test, classes)")
    p.add_argument("--scale", choices=sorted(SCALES), default="small")
    p.add_argument("--seeds", default="0", help="comma-separated seeds, e.g. 0,1,2")
    p.add_argument("--arms", default=",".join(ARMS), help=f"which of {', '.join(ARMS)} to run")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "fidelity"))
    p.add_argument("--name", default=None, help="the files' name in --out (default fidelity_<scale>): one table per "
                                                "set of seeds and arms, the runs shared")
    return p.parse_args(argv)


def run(out: Path, settings: dict, quiet: bool = True, stop_after: Optional[str] = None) -> dict:
    """One pipeline run in `out` (resumed when it is already there), returning its summary; stop_after ("baseline",
    "snl") makes only its start, which a later whole run of the same settings resumes from."""
    if (out / "summary.json").is_file():
        print(f"reusing {out}", flush=True)
        return finished(out)
    config = validate(resolve({**settings, "out": str(out)}, yaml_values=ARMS_DEFAULTS))
    return Pipeline.prepare(config, resume=out.exists(), progress=not quiet,
                            log=lambda message: print(f"[{out.name}] {message}", flush=True)).run(stop_after)


def first_run_stop(arms: list[str]) -> Optional[str]:
    """How far run 1 goes: whole when its rows are asked for, else only the start the arms asked for take from it
    (its SNL@B_ref model, or its baseline alone for the arms that redo SNL from it)."""
    if {"default", "default-absolute"} & set(arms):
        return None
    return "snl" if set(arms) - set(FROM_BASELINE) else "baseline"


def spread(values: list[float]) -> float:
    """The standard deviation over seeds (0 for one seed)."""
    return statistics.stdev(values) if len(values) > 1 else 0.0


def finished(out: Path) -> dict:
    """The summary of a run done before."""
    return json.loads((out / "summary.json").read_text())


def bcd_rows(summary: dict, arm: str, seed: int) -> list[dict]:
    import csv

    with (Path(summary["config"]["out"]) / "steps.csv").open() as f:
        steps = list(csv.DictReader(f))
    rows = []
    for t in summary.get("targets", []):
        done = [r for r in steps if int(r["step"]) <= t["step"]]
        rows.append({"arm": arm, "method": "BCD", "seed": seed, "budget": t["budget"], "test_acc": t["test_acc"],
                     "val_acc": t["val_acc"], "train_images": t["train_images"], "forward_images": t["forward_images"],
                     "seconds": sum(float(r["seconds"]) for r in done), "steps": len(done),
                     "fallbacks": sum(r["fallback"] == "True" for r in done),
                     "run": summary["config"]["out"],
                     "model": str(Path(summary["config"]["out"]) / "targets" / str(t["budget"]) / "model.safetensors")})
    return rows


def snl_rows(summary: dict, arm: str, seed: int) -> list[dict]:
    out = Path(summary["config"]["out"])
    return [{"arm": arm, "method": "SNL", "seed": seed, "budget": t["budget"], "test_acc": t["test_acc"],
             "val_acc": t["val_acc"], "train_images": t["train_images"], "forward_images": t["forward_images"],
             "seconds": t["seconds"], "steps": None, "fallbacks": None, "run": str(out),
             "model": str(out / "snl_targets" / str(t["budget"]) / "model.safetensors")}
            for t in summary.get("snl_targets", [])]


def shared_snl_rows(summary: dict, snl_run: dict, arm: str, seed: int) -> list[dict]:
    """SNL's rows of `snl_run`, at the targets the arm reached, for an arm that spent no more images (train +
    forward, the compute SNL's finetune is sized by) to any of them than the BCD of `snl_run` did, so SNL's compute is
    at least BCD's (else RuntimeError)."""
    theirs = {t["budget"]: t for t in snl_run.get("targets", [])}

    def images(t: dict) -> int:
        return t["train_images"] + t["forward_images"]

    for t in summary.get("targets", []):
        other = theirs.get(t["budget"])
        if other is None or images(t) > images(other):
            raise RuntimeError(f"{arm} spent more images than {snl_run['config']['out']} to {t['budget']} ReLUs: "
                               "its SNL side must run (take it out of SNL_FROM)")
    reached = {t["budget"] for t in summary.get("targets", [])}
    return [row for row in snl_rows(snl_run, arm, seed) if row["budget"] in reached]


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    arms = [a for a in args.arms.split(",") if a.strip()]
    unknown = sorted(set(arms) - set(ARMS))
    if unknown:
        raise SystemExit(f"unknown arms {', '.join(unknown)}; choose from {', '.join(ARMS)}")
    base = {"data.dataset": f"npz:{Path(args.data).resolve()}", "model.arch": "resnet18", "device": args.device,
            **SCALES[args.scale], **SIGNED}
    rows, runs = [], {}
    train_size = len(run_dataset(validate(resolve({**base, "out": str(out)}, yaml_values=ARMS_DEFAULTS))).train_y)
    for seed in seeds:
        root = out / args.scale / f"seed{seed}"
        first = run(root / "identity", {**base, "seed": seed, "method": "both"}, stop_after=first_run_stop(arms))
        runs[f"seed{seed}/identity"] = first
        # run 1's SNL@B_ref model and its teacher: the start of the arms below
        from_first = {"model.checkpoint": str(root / "identity" / "snl" / "model.safetensors"),
                      "model.teacher": str(root / "identity" / "baseline" / "model.safetensors")}
        if "default" in arms:
            rows += bcd_rows(first, "default", seed) + snl_rows(first, "default", seed)
        if "paper" in arms:  # the paper's Algorithm 2 from the same SNL@B_ref model and teacher
            paper = run(root / "paper", {**base, **PAPER_SEARCH, **from_first, "seed": seed, "method": "bcd"})
            runs[f"seed{seed}/paper"] = paper
            rows += bcd_rows(paper, "paper", seed)
        if "default-absolute" in arms:  # run 1's search with the estimate it defaults to now; its SNL is run 1's
            absolute = run(root / "default-absolute", {**base, **from_first, "seed": seed, "method": "bcd",
                                                       "bcd.estimate": "absolute"})
            runs[f"seed{seed}/default-absolute"] = absolute
            rows += bcd_rows(absolute, "default-absolute", seed) + shared_snl_rows(absolute, first,
                                                                                  "default-absolute", seed)
        if "finetuned" in arms:  # the first default search, finetuned at each target, and SNL with the same compute
            tuned = run(root / "finetuned", {**base, **from_first, "seed": seed, "method": "both",
                                             "finetune.target_epochs": TARGET_FINETUNE_EPOCHS[args.scale]})
            runs[f"seed{seed}/finetuned"] = tuned
            rows += bcd_rows(tuned, "finetuned", seed) + snl_rows(tuned, "finetuned", seed)
        for arm, variant in lean_arms(args.scale, root, train_size).items():
            # a start alone (settled's, settled-polynomial's) when only the arms that start from it are asked for
            start_only = arm not in arms and bool(set(STARTS.get(arm, ())) & set(arms))
            if arm not in arms and not start_only:
                continue
            if isinstance(variant, ValueError):
                raise SystemExit(f"{arm}: {variant}")
            stop_after = "snl" if start_only else None
            # an arm in SNL_FROM takes its SNL rows from that run when this seed has it (asked for now, or done
            # before), and runs its own SNL side (the same compute) when not
            snl_source = SNL_FROM.get(arm)
            shares_snl = snl_source is not None and (
                snl_source in arms or (root / snl_source / "summary.json").is_file())
            # a cheaper search (half the steps, half the candidates), finetuned at each target
            lean = run(root / arm, {**base, **from_first, **lean_search(SCALES[args.scale]), "seed": seed,
                                    "method": "bcd" if shares_snl else "both",
                                    "finetune.target_epochs": TARGET_FINETUNE_EPOCHS[args.scale], **variant},
                       stop_after=stop_after)
            runs[f"seed{seed}/{arm}"] = lean
            if stop_after is None:
                rows += bcd_rows(lean, arm, seed) + (
                    shared_snl_rows(lean, runs.get(f"seed{seed}/{snl_source}") or finished(root / snl_source), arm,
                                    seed) if shares_snl else snl_rows(lean, arm, seed))
        if "polynomial" in arms:
            baseline = str(root / "identity" / "baseline" / "model.safetensors")
            poly = run(root / "polynomial", {**base, "seed": seed, "method": "both", "replacement": "polynomial",
                                             "model.checkpoint": baseline, "model.teacher": baseline})
            runs[f"seed{seed}/polynomial"] = poly
            rows += bcd_rows(poly, "polynomial", seed) + snl_rows(poly, "polynomial", seed)

    import numpy as np

    test_images = int(np.load(args.data)["y_test"].shape[0])
    payload = {"scale": args.scale, "settings": SCALES[args.scale], "seeds": seeds, "machine": report.machine(),
               "data": Path(args.data).name, "rows": rows, "table": aggregate(rows), "test_images": test_images,
               "test_standard_error_points_max": 100 * math.sqrt(0.25 / test_images),
               "gaps": gaps(rows, per_image_correct()),
               "references": {k: {"snl": v.get("snl"), "baseline": v.get("baseline")} for k, v in runs.items()}}
    name = args.name or f"fidelity_{args.scale}"
    report.write_json(out / f"{name}.json", payload)
    text = markdown(payload)
    report.atomic_write_text(out / f"{name}.md", text)
    series = {}
    for r in payload["table"]:
        series.setdefault(f"{r['method']} ({r['arm']})", []).append((r["budget"], r["test_mean"]))
    report.plot_accuracy_vs_budget(out / f"{name}.png", series, ylabel="test accuracy (%), mean")
    print(text)
    return payload


def aggregate(rows: list[dict]) -> list[dict]:
    """Mean and std over seeds per (arm, method, budget)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["arm"], r["method"], r["budget"]), []).append(r)
    table = []
    for (arm, method, budget), group in groups.items():
        accs = [g["test_acc"] for g in group]
        table.append({"arm": arm, "method": method, "budget": budget, "seeds": len(group),
                      "test_mean": statistics.fmean(accs), "test_std": spread(accs),
                      "val_mean": statistics.fmean(g["val_acc"] for g in group),
                      "train_images": statistics.fmean(g["train_images"] for g in group),
                      "forward_images": statistics.fmean(g["forward_images"] for g in group),
                      "seconds": statistics.fmean(g["seconds"] for g in group),
                      "fallbacks": None if group[0]["fallbacks"] is None else
                      statistics.fmean(g["fallbacks"] for g in group)})
    return sorted(table, key=lambda r: (-r["budget"], ARMS.index(r["arm"]), r["method"]))


def gaps(rows: list[dict], correct: Optional[Callable[[dict], "torch.Tensor"]] = None) -> list[dict]:
    """BCD minus SNL per (arm, budget), seed by seed (both from the same start and seed), then mean and std. With
    `correct` (a row -> its model's per-test-image right/wrong), also the test-set standard error of the mean gap,
    paired by image (paired_standard_error)."""
    by_key = {(r["arm"], r["budget"], r["seed"], r["method"]): r for r in rows}
    groups: dict[tuple, list[tuple[dict, dict]]] = {}
    for (arm, budget, seed, method), r in sorted(by_key.items()):
        snl = by_key.get((arm, budget, seed, "SNL"))
        if method == "BCD" and snl is not None:
            groups.setdefault((arm, budget), []).append((r, snl))
    table = []
    for (arm, budget), pairs in groups.items():
        test = [b["test_acc"] - s["test_acc"] for b, s in pairs]
        val = [b["val_acc"] - s["val_acc"] for b, s in pairs]
        paired = None if correct is None else paired_standard_error(
            [correct(b).double() - correct(s).double() for b, s in pairs])
        table.append({"arm": arm, "budget": budget, "seeds": len(pairs), "test_gaps": test, "val_gaps": val,
                      "test_mean": statistics.fmean(test), "test_std": spread(test), "test_paired_se": paired,
                      "val_mean": statistics.fmean(val), "val_std": spread(val)})
    return sorted(table, key=lambda r: (-r["budget"], ARMS.index(r["arm"])))


def paired_standard_error(differences: list["torch.Tensor"]) -> float:
    """The test-set standard error, in points, of a gap averaged over seeds, from each seed's per-image difference
    (BCD right minus SNL right: -1, 0 or 1, on the same test images). The seeds' differences are averaged image by
    image first, since every seed is tested on the same images; what is left is the spread over images, which a
    binomial error per model (up to 1.1 points at 2,000 images) overstates when both models get most images alike.
    It says how far the mean gap could move on another test set of this size, not on other seeds (the std does)."""
    import torch

    per_image = torch.stack(differences).mean(dim=0)
    if per_image.numel() < 2:
        return math.nan
    return 100.0 * float(per_image.std(unbiased=True)) / math.sqrt(per_image.numel())


def per_image_correct() -> Callable[[dict], "torch.Tensor"]:
    """row -> whether its model classifies each test image right, on the CPU (each model and dataset read once)."""
    from fastmask import checkpoint, train
    from fastmask.config import load_saved

    datasets, right = {}, {}

    def correct(row: dict):
        if row["model"] not in right:
            config = load_saved(Path(row["run"]) / "config.yaml")
            key = (config.data.dataset, config.data.data_dir, config.data.val_size, config.seed)
            if key not in datasets:
                datasets[key] = run_dataset(config)
            dataset = datasets[key]
            model = checkpoint.load_model(row["model"])
            right[row["model"]] = train.correct_per_image(model, dataset.test_x, dataset.test_y, dataset, "cpu")
        return right[row["model"]]
    return correct


def markdown(p: dict) -> str:
    s = p["settings"]
    machine = p["machine"].get("gpu") or f"{p['machine']['cpu_threads']} CPU threads"
    lines = [f"## Fidelity, scale {p['scale']} ({p['data']}, resnet18 width {s['model.width']}, seeds "
             f"{','.join(map(str, p['seeds']))}; {machine})", "",
             f"B_ref {s['snl.ref_budget']}, DRC {s['bcd.drc']}, RT {s['bcd.rt']}, ADT {s['bcd.adt']} points on "
             f"{s['bcd.score_subset'] or 'all'} train images, {s.get('finetune.max_steps') or 'an epoch of'} finetune "
             "steps per BCD step. default-absolute and every arm from gradual-absolute on rank informed candidates by "
             "the absolute estimate, the others by the signed one. "
             "default = informed candidates + racing; paper = uniform candidates + exact "
             "scoring (Algorithm 2) at the same DRC/RT/finetune; default-absolute = default with the absolute "
             "estimate (its SNL rows are default's); finetuned = default + "
             f"{TARGET_FINETUNE_EPOCHS[p['scale']]} finetune epochs whenever it lands on a target; lean = "
             "finetuned with twice the DRC and half the RT; lean-lr = lean with every finetune (both methods) at "
             f"SGD lr {LEAN_FINETUNE_LR:g}; lean-adam = lean with every finetune (both methods) on Adam at lr "
             f"{LEAN_ADAM['finetune.lr']:g} (SNL's alpha phase); settled = lean-lr from an SNL@B_ref model finetuned "
             f"{SETTLED_SNL_FINETUNE_EPOCHS[p['scale']]} epochs instead of {s['snl.finetune_epochs']}, which both "
             "methods start from; settled-adam = lean-adam from settled's start; gradual = settled-adam with the "
             "scale's DRC, 2 candidates scored on half the subset and twice the finetune steps per BCD step; "
             "gradual-absolute = gradual with the absolute removal estimate; continuous = gradual-absolute with one "
             "optimizer carried through the step finetunes at a constant lr; continuous-pool = continuous with "
             f"candidates from the {CONTINUOUS_POOL:g} x DRC cheapest ReLUs; continuous-loss = continuous picking its "
             "candidate by loss, not accuracy; continuous-geometric = continuous removing "
             f"{GEOMETRIC_FRACTION:g} of the present ReLUs per step; continuous-quota = continuous with each site "
             "giving its share of every step's removals; continuous-fade = continuous with each step's ReLUs fading "
             "to the identity over its finetune; continuous-summed = continuous with the estimate summed over the "
             "finetunes' batches too; continuous-summed-signed = continuous-summed with the signed estimate; "
             "continuous-channels = continuous weighing each ReLU's estimate by its "
             "channel's ReLU count; continuous-restore = continuous putting back, every step, up to "
             f"{RESTORE_SHARE:.2g} of its DRC of the absent ReLUs estimated to lower the loss most, and removing as "
             "many more; continuous-direct = continuous from B_ref straight to the last target, the images of "
             "the target finetunes on the way spent on the finetunes between removals; continuous-unscored = "
             "continuous with one candidate per step taken unscored, its forwards spent on the step's finetune; "
             "continuous-combined = the last three together; continuous-direct-final, continuous-direct-steps = "
             "continuous-direct with the target finetunes' images all on the last mask's finetune, or half of its "
             "own moved to the finetunes between removals; continuous-direct-fine, continuous-direct-finer = "
             "continuous-direct in steps of a half and a quarter of the DRC, one candidate per step taken unscored; "
             "continuous-direct-fine-first = continuous-direct-fine straight to the first target; "
             "continuous-direct-greedy, continuous-direct-greedy-first = continuous-direct-fine and -fine-first "
             "removing the estimate's cheapest ReLUs, not a draw from the 4 x DRC cheapest; "
             "continuous-direct-greedy-summed = continuous-direct-greedy with the estimate summed over the "
             "finetunes' batches too (the SNL rows of the last twenty-two are gradual's SNL "
             "run where the seed has one: the same start and seed, and at least the images); settled-polynomial = "
             "settled with the polynomial replacement on both sides; continuous-polynomial = continuous from "
             "settled-polynomial's start with the polynomial on both sides (its own SNL run). SNL goes from the same "
             "B_ref model straight to the target, then finetunes with what is left of the compute of the BCD "
             "run beside it (train + forward images). "
             f"Test standard error up to {p['test_standard_error_points_max']:.2f} points per seed.",
             "",
             "Equal compute (--method both) counts image passes: train + forward. A training pass costs "
             f"about {TRAIN_PASS_IN_FORWARDS:g} forwards (forward + backward; the KD teacher's forward on top), so "
             "'train-equivalent' (train + forward / "
             f"{TRAIN_PASS_IN_FORWARDS:g}) is closer to FLOPs and to wall time.",
             "",
             "| ReLUs | arm | method | seeds | test % mean | std | val % | train images | forward images | "
             "train-equivalent | wall s | fallbacks |",
             "| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in p["table"]:
        fallbacks = "" if r["fallbacks"] is None else f"{r['fallbacks']:.1f}"
        lines.append(f"| {r['budget']} | {r['arm']} | {r['method']} | {r['seeds']} | {r['test_mean']:.2f} | "
                     f"{r['test_std']:.2f} | {r['val_mean']:.2f} | {r['train_images']:,.0f} | "
                     f"{r['forward_images']:,.0f} | "
                     f"{r['train_images'] + r['forward_images'] / TRAIN_PASS_IN_FORWARDS:,.0f} | "
                     f"{r['seconds']:.0f} | {fallbacks} |")
    lines += ["", "BCD minus SNL, seed by seed (the same start and seed on both sides), in points:", "",
              "| ReLUs | arm | seeds | test gap mean | std | paired test SE | per seed | val gap mean | std | "
              "per seed |",
              "| ---: | --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | --- |"]
    for g in p["gaps"]:
        se = g.get("test_paired_se")
        lines.append(f"| {g['budget']} | {g['arm']} | {g['seeds']} | {g['test_mean']:+.2f} | {g['test_std']:.2f} | "
                     f"{'' if se is None else f'{se:.2f}'} | "
                     f"{', '.join(f'{x:+.2f}' for x in g['test_gaps'])} | {g['val_mean']:+.2f} | "
                     f"{g['val_std']:.2f} | {', '.join(f'{x:+.2f}' for x in g['val_gaps'])} |")
    lines += ["", "Paired test SE: the standard error of the mean test gap over test images, each seed's BCD and "
              "SNL models compared image by image on the same test set (how far the gap could move on another test "
              "set of this size; the std is how far it moves from seed to seed)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
