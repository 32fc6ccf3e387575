"""bench/fidelity.py's gap statistics (BCD minus SNL per seed, the paired test-set standard error) and its
equal-compute bookkeeping (the direct arm's images, SNL rows shared between arms)."""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench" / "fidelity.py"


@pytest.fixture(scope="module")
def fidelity():
    spec = importlib.util.spec_from_file_location("fidelity", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_paired_standard_error_averages_the_seeds_image_by_image(fidelity):
    # per image, over the two seeds: 1, 0, 0, 0 -> std 0.5 over 4 images -> 25 points
    differences = [torch.tensor([1.0, 0.0, 0.0, -1.0]), torch.tensor([1.0, 0.0, 0.0, 1.0])]
    assert fidelity.paired_standard_error(differences) == pytest.approx(25.0)
    assert fidelity.paired_standard_error([torch.zeros(100)]) == 0.0  # two models alike on every image
    assert math.isnan(fidelity.paired_standard_error([torch.ones(1)]))


def test_gaps_pair_each_bcd_row_with_its_seeds_snl_row(fidelity):
    def row(method, seed, test, val, right):
        return {"arm": "continuous", "method": method, "seed": seed, "budget": 1500, "test_acc": test,
                "val_acc": val, "right": torch.tensor(right, dtype=torch.bool)}

    rows = [row("BCD", 0, 60.0, 58.0, [1, 1, 0, 0]), row("SNL", 0, 61.0, 59.5, [1, 0, 1, 1]),
            row("BCD", 1, 62.0, 60.0, [1, 1, 1, 0]), row("SNL", 1, 61.5, 60.0, [0, 1, 1, 0]),
            row("BCD", 2, 70.0, 70.0, [1, 1, 1, 1])]  # no SNL row for seed 2: not a pair
    [plain] = fidelity.gaps(rows)
    assert plain["test_gaps"] == [-1.0, 0.5] and plain["val_gaps"] == [-1.5, 0.0]
    assert plain["test_mean"] == pytest.approx(-0.25) and plain["test_paired_se"] is None
    [paired] = fidelity.gaps(rows, lambda r: r["right"])
    # per image: seed 0 (0, 1, -1, -1), seed 1 (1, 0, 0, 0) -> means (0.5, 0.5, -0.5, -0.5)
    assert paired["test_paired_se"] == pytest.approx(100 * 0.5773502691896258 / 2)


def images_to_each_target(fidelity, settings: dict, train_size: int) -> tuple[dict[int, int], int]:
    """({target: train + forward images to it}, BCD steps) of a continuous-like run, counted as the pipeline counts
    them (full batches assumed): finetune batches and the estimate's pass over the scoring subset are trained on, the
    reference and the race's candidates pushed forward, and a target finetune follows every target."""
    subset = settings["bcd.score_subset"] or train_size
    rt = settings["bcd.rt"]
    assert rt <= 2  # the race's images below hold for at most two candidates
    first = fidelity.default_first_slice(rt, subset, 2)
    race = 0 if rt == 1 else (rt * first + subset if first < subset else rt * subset)
    per_step = fidelity.step_finetune_images(settings, train_size) + subset + subset + race
    count, images, steps, at_targets = settings["snl.ref_budget"], 0, 0, {}
    while count > settings["bcd.targets"][-1]:
        target, remove = fidelity.plan_removal(count, settings["bcd.targets"], settings["bcd.drc"])
        count, images, steps = count - remove, images + per_step, steps + 1
        if count == target:
            images += settings.get("finetune.target_epochs",
                                   fidelity.TARGET_FINETUNE_EPOCHS[settings["scale"]]) * train_size
            at_targets[target] = images
    return at_targets, steps


STRAIGHT_ARMS = {  # arm: (its search, its candidates per step, its target finetune's share of the scale's)
    "direct": (lambda f, *a: f.direct_search(*a), 2, 1.0),
    "combined": (lambda f, *a: f.direct_search(*a, unscored=True), 1, 1.0),
    "direct-final": (lambda f, s, n: f.straight_search(s, n, target_epochs=2 * f.TARGET_FINETUNE_EPOCHS[s]), 2, 2.0),
    "direct-steps": (lambda f, s, n: f.straight_search(s, n, target_epochs=f.TARGET_FINETUNE_EPOCHS[s] // 2), 2, 0.5),
    "direct-fine": (lambda f, s, n: f.straight_search(s, n, rt=1, drc=f.SCALES[s]["bcd.drc"] // 2), 1, 1.0),
    "direct-finer": (lambda f, s, n: f.straight_search(s, n, rt=1, drc=f.SCALES[s]["bcd.drc"] // 4), 1, 1.0),
    "direct-fine-first": (lambda f, s, n: f.straight_search(s, n, rt=1, drc=f.SCALES[s]["bcd.drc"] // 2, target=0),
                          1, 1.0),
}


@pytest.mark.parametrize("scale", ["smoke", "small", "full"])
@pytest.mark.parametrize("train_size", [1000, 9000, 45000])
@pytest.mark.parametrize("arm", ["unscored", *STRAIGHT_ARMS])
def test_an_arm_sharing_continuous_snl_spends_no_more_images_to_the_last_target(fidelity, scale, train_size, arm):
    gradual = {**fidelity.SCALES[scale], **fidelity.gradual_search(fidelity.SCALES[scale]), "scale": scale,
               "bcd.rt": 2}
    if arm == "unscored":
        search, rt, share = fidelity.unscored_search(scale, train_size), 1, 1.0
    else:
        make, rt, share = STRAIGHT_ARMS[arm]
        try:
            search = make(fidelity, scale, train_size)
        except ValueError as too_fine:  # a quarter of the DRC: the steps' estimates and references eat the images
            assert arm == "direct-finer" and "leave no finetune step" in str(too_fine)
            return
    theirs, _ = images_to_each_target(fidelity, gradual, train_size)
    mine, steps = images_to_each_target(fidelity, {**gradual, **search}, train_size)
    last = gradual["bcd.targets"][0 if arm.endswith("-first") else -1]
    assert sorted(mine) == (sorted(theirs) if arm == "unscored" else [last])
    assert search.get("bcd.rt", 2) == rt
    assert search.get("finetune.target_epochs", fidelity.TARGET_FINETUNE_EPOCHS[scale]) == int(
        share * fidelity.TARGET_FINETUNE_EPOCHS[scale])
    assert search["finetune.max_steps"] > 0
    assert theirs[last] - steps * fidelity.BATCH < mine[last] <= theirs[last]  # all but under a batch per step
    assert all(mine[t] <= theirs[t] for t in mine)


def test_the_straight_arms_split_continuous_images_as_described(fidelity):
    # small scale, 9,000 train images: continuous's 36 finetune steps per BCD step come back when the target
    # finetune takes all the images continuous finetunes its two targets on; half the DRC doubles the steps
    assert fidelity.direct_search("small", 9000)["finetune.max_steps"] == 82
    assert fidelity.straight_search("small", 9000, target_epochs=20)["finetune.max_steps"] == 36
    assert fidelity.straight_search("small", 9000, target_epochs=5)["finetune.max_steps"] == 106
    fine = fidelity.straight_search("small", 9000, rt=1, drc=150)
    assert (fine["bcd.drc"], fine["finetune.max_steps"]) == (150, 41)
    assert fidelity.straight_search("small", 9000, target=0)["finetune.max_steps"] == 36  # continuous to 3,000
    first = fidelity.straight_search("small", 9000, rt=1, drc=150, target=0)
    assert (first["bcd.targets"], first["finetune.max_steps"]) == ([3000], 18)
    assert fidelity.straight_search("small", 9000, rt=1, drc=75)["finetune.max_steps"] == 12
    with pytest.raises(ValueError, match="60 steps of 75 ReLUs leave no finetune step"):
        fidelity.straight_search("small", 1000, rt=1, drc=75)
    with pytest.raises(ValueError, match="one or two candidates"):
        fidelity.straight_search("small", 9000, rt=3)


def test_shared_snl_rows_are_those_of_the_targets_reached_and_need_no_more_images(fidelity):
    def target(budget, train, forward):
        return {"budget": budget, "train_images": train, "forward_images": forward, "test_acc": 50.0,
                "val_acc": 50.0, "seconds": 1.0}

    snl_run = {"config": {"out": "runs/continuous"}, "targets": [target(3000, 100, 30), target(1500, 200, 40)],
               "snl_targets": [target(3000, 130, 0), target(1500, 240, 0)]}
    direct = {"targets": [target(1500, 190, 40)]}
    rows = fidelity.shared_snl_rows(direct, snl_run, "continuous-direct", 0)
    assert [(r["budget"], r["method"], r["train_images"]) for r in rows] == [(1500, "SNL", 240)]
    with pytest.raises(RuntimeError, match="spent more images"):
        fidelity.shared_snl_rows({"targets": [target(1500, 201, 40)]}, snl_run, "continuous-direct", 0)
    # compute is train + forward images: training what scoring no longer pushes forward is the same compute
    assert len(fidelity.shared_snl_rows({"targets": [target(1500, 230, 10)]}, snl_run, "continuous-unscored", 0)) == 1
    with pytest.raises(RuntimeError, match="spent more images"):
        fidelity.shared_snl_rows({"targets": [target(1500, 231, 10)]}, snl_run, "continuous-unscored", 0)


def test_an_arm_too_fine_for_a_scale_says_so_only_when_asked_for(fidelity, tmp_path):
    small, full = fidelity.lean_arms("small", tmp_path, 9000), fidelity.lean_arms("full", tmp_path, 9000)
    assert small["continuous-direct-finer"]["bcd.drc"] == 75
    assert isinstance(full["continuous-direct-finer"], ValueError)  # the other arms still build at that scale
    assert full["continuous-direct-fine"]["bcd.drc"] == 50


@pytest.mark.parametrize("scale", ["small", "full"])
def test_the_greedy_arms_are_the_fine_arms_taking_the_cheapest(fidelity, tmp_path, scale):
    arms = fidelity.lean_arms(scale, tmp_path, 9000)
    for fine, greedy in (("continuous-direct-fine", "continuous-direct-greedy"),
                         ("continuous-direct-fine-first", "continuous-direct-greedy-first")):
        assert arms[greedy] == {**arms[fine], "bcd.pool": 1.0}
        assert "bcd.pool" not in arms[fine]  # the fine arms draw from the default 4 x DRC
        assert greedy in fidelity.SNL_FROM and greedy in fidelity.SETTLED_STARTS and greedy in fidelity.ARMS
    summed = arms["continuous-direct-greedy-summed"]
    assert summed == {**arms["continuous-direct-greedy"], "bcd.estimate_from": "subset+finetune"}
