"""bench/fidelity.py: its gap statistics (BCD minus SNL per seed, the paired test-set standard error, mean and std over
seeds), the rows it reads from a run, its arms' settings (the default arm is fastmask's default search, the paper arm
the paper preset's), and a whole run of it on a tiny model."""
from __future__ import annotations

import csv
import json
import math
import statistics

import numpy as np
import pytest
import torch
from helpers import bench_script

from fastmask.config import PRESETS, RunConfig, get, resolve, validate


@pytest.fixture(scope="module")
def fidelity():
    return bench_script("fidelity")


def row(method="BCD", seed=0, test=60.0, val=58.0, *, arm="default", budget=1500, train=100, forward=20,
        seconds=1.0, fallbacks=None, right=(1, 0)):
    return {"arm": arm, "method": method, "seed": seed, "budget": budget, "test_acc": test, "val_acc": val,
            "train_images": train, "forward_images": forward, "seconds": seconds, "fallbacks": fallbacks,
            "right": torch.tensor(right, dtype=torch.bool)}


def test_paired_standard_error_averages_the_seeds_image_by_image(fidelity):
    # per image, over the two seeds: 1, 0, 0, 0 -> std 0.5 over 4 images -> 25 points
    differences = [torch.tensor([1.0, 0.0, 0.0, -1.0]), torch.tensor([1.0, 0.0, 0.0, 1.0])]
    assert fidelity.paired_standard_error(differences) == pytest.approx(25.0)
    assert fidelity.paired_standard_error([torch.zeros(100)]) == 0.0  # two models alike on every image
    assert math.isnan(fidelity.paired_standard_error([torch.ones(1)]))


def test_gaps_pair_each_bcd_row_with_its_seeds_snl_row(fidelity):
    rows = [row("BCD", 0, 60.0, 58.0, right=[1, 1, 0, 0]), row("SNL", 0, 61.0, 59.5, train=120, right=[1, 0, 1, 1]),
            row("BCD", 1, 62.0, 60.0, right=[1, 1, 1, 0]), row("SNL", 1, 61.5, 60.0, train=120, right=[0, 1, 1, 0]),
            row("BCD", 2, 70.0, 70.0, right=[1, 1, 1, 1])]  # no SNL row for seed 2: not a pair
    [plain] = fidelity.gaps(rows)
    assert plain["test_gaps"] == [-1.0, 0.5] and plain["val_gaps"] == [-1.5, 0.0]
    assert plain["test_mean"] == pytest.approx(-0.25) and plain["test_paired_se"] is None
    assert plain["test_std"] == pytest.approx(statistics.stdev([-1.0, 0.5]))
    [paired] = fidelity.gaps(rows, lambda r: r["right"])
    # per image: seed 0 (0, 1, -1, -1), seed 1 (1, 0, 0, 0) -> means (0.5, 0.5, -0.5, -0.5)
    assert paired["test_paired_se"] == pytest.approx(100 * 0.5773502691896258 / 2)


def test_gaps_refuse_an_snl_row_with_less_compute_than_its_bcd_row(fidelity):
    # compute is train + forward images: 120 trained match BCD's 100 trained + 20 pushed forward
    assert len(fidelity.gaps([row("BCD", train=100, forward=20), row("SNL", train=120, forward=0)])) == 1
    with pytest.raises(RuntimeError, match="not equal compute"):
        fidelity.gaps([row("BCD", train=100, forward=20), row("SNL", train=119, forward=0)])


def test_aggregate_takes_mean_and_std_over_seeds(fidelity):
    rows = [row("BCD", 0, 60.0, 58.0, train=100, forward=20, seconds=10.0, fallbacks=1),
            row("BCD", 1, 62.0, 60.0, train=120, forward=30, seconds=20.0, fallbacks=2),
            row("SNL", 0, 61.0, 59.0, train=130, forward=0),
            row("BCD", 0, 50.0, 49.0, arm="paper", budget=3000)]
    paper, bcd, snl = fidelity.aggregate(rows)  # the higher budget first, then the arms in ARMS' order
    assert (paper["arm"], paper["budget"], bcd["method"], snl["method"]) == ("paper", 3000, "BCD", "SNL")
    assert bcd["seeds"] == 2 and bcd["test_mean"] == 61.0 and bcd["val_mean"] == 59.0
    assert bcd["test_std"] == pytest.approx(math.sqrt(2.0))
    assert (bcd["train_images"], bcd["forward_images"], bcd["seconds"], bcd["fallbacks"]) == (110, 25, 15.0, 1.5)
    assert snl["test_std"] == 0.0 and snl["fallbacks"] is None  # one seed; SNL has no fallbacks


def test_method_rows_read_each_target_of_a_both_run(fidelity, tmp_path):
    with (tmp_path / "steps.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["step", "seconds", "fallback"])
        writer.writeheader()
        writer.writerows([{"step": 1, "seconds": 2.0, "fallback": True}, {"step": 2, "seconds": 3.0, "fallback": False},
                          {"step": 3, "seconds": 4.0, "fallback": True}])

    def target(budget, **more):
        return {"budget": budget, "test_acc": 50.0, "val_acc": 49.0, **more}

    summary = {"config": {"out": str(tmp_path)},
               "targets": [target(3000, step=2, train_images=10, forward_images=5),
                           target(1500, step=3, train_images=20, forward_images=8)],
               "snl_targets": [target(3000, train_images=15, forward_images=0, seconds=7.0)]}
    first, last, snl = fidelity.method_rows(summary, "default", 1)
    assert (first["seconds"], first["fallbacks"], first["train_images"], first["forward_images"]) == (5.0, 1, 10, 5)
    assert (last["seconds"], last["fallbacks"], last["budget"], last["seed"]) == (9.0, 2, 1500, 1)
    assert (snl["method"], snl["seconds"], snl["fallbacks"], snl["train_images"]) == ("SNL", 7.0, None, 15)
    assert snl["model"] == str(tmp_path / "snl_targets" / "3000" / "model.safetensors")
    assert first["model"] == str(tmp_path / "targets" / "3000" / "model.safetensors")


def settings_of(fidelity, scale, root):
    common = {"data.dataset": "digits", "model.arch": "resnet18", "seed": 0, **fidelity.SCALES[scale]}
    return {name: validate(resolve({"out": str(root / name)}, yaml_values={**common, **settings}))
            for name, settings in fidelity.run_settings(scale, root).items()}


@pytest.mark.parametrize("scale", ["smoke", "small", "full"])
def test_every_arm_is_a_both_run_from_its_start(fidelity, tmp_path, scale):
    configs = settings_of(fidelity, scale, tmp_path)
    assert sorted(configs) == sorted(fidelity.STARTS + fidelity.ARMS)
    baseline = str(tmp_path / "identity" / "baseline" / "model.safetensors")
    for arm, start in fidelity.START_OF.items():
        config = configs[arm]
        assert config.method == "both" and config.model.teacher == baseline
        assert config.model.checkpoint == str(tmp_path / start / "snl" / "model.safetensors")
        assert config.replacement == configs[start].replacement
    assert configs["settled"].model.checkpoint == baseline and configs["identity"].model.checkpoint is None
    assert configs["settled"].snl.finetune_epochs == fidelity.SIZES[scale]["settled_epochs"]


# The paths an arm sizes to the scale (and the run's own: its start, its method)
SIZED = {"bcd.drc", "bcd.score_subset", "finetune.epochs", "finetune.max_steps", "finetune.target_epochs", "method",
         "model.checkpoint", "model.teacher"}


@pytest.mark.parametrize("scale", ["smoke", "small", "full"])
def test_the_default_arm_is_fastmasks_default_search(fidelity, tmp_path, scale):
    arms = fidelity.run_settings(scale, tmp_path)
    defaults = RunConfig()
    for path, value in arms["default"].items():
        if path not in SIZED:
            assert value == get(defaults, path), path
    polynomial_start = str(tmp_path / "settled-polynomial" / "snl" / "model.safetensors")
    assert arms["polynomial"] == {**arms["default"], "replacement": "polynomial", "model.checkpoint": polynomial_start}


@pytest.mark.parametrize("scale", ["smoke", "small", "full"])
def test_the_paper_arm_is_the_paper_presets_search(fidelity, tmp_path, scale):
    paper = fidelity.run_settings(scale, tmp_path)["paper"]
    compared = [path for path in paper if path in PRESETS["paper"] and path not in SIZED | {"bcd.rt"}]
    assert {"bcd.proposal", "bcd.scoring", "finetune.optimizer", "finetune.step_schedule"} <= set(compared)
    for path in compared:
        assert paper[path] == PRESETS["paper"][path], path
    if scale == "full":  # the paper's own search sizes
        assert (paper["bcd.drc"], paper["bcd.rt"], paper["bcd.score_subset"]) == (100, 50, 0)


@pytest.mark.filterwarnings("ignore:ADT .* is below 2 standard errors")
def test_a_tiny_run_writes_both_methods_rows_for_every_arm(fidelity, tmp_path, monkeypatch, one_thread):
    """The whole bench on 16x16 digits and a width-4 resnet18: every arm's two methods at both targets, equal
    compute, paired errors from the models, and the tables written."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.kron(digits.images * (255.0 / 16.0), np.ones((2, 2))).astype(np.uint8)  # 8x8 -> 16x16
    data = tmp_path / "digits.npz"
    np.savez(data, x_train=pixels[:1400], y_train=digits.target[:1400], x_test=pixels[1400:],
             y_test=digits.target[1400:])
    monkeypatch.setitem(fidelity.SCALES, "smoke", {
        "model.width": 4, "baseline.epochs": 1, "snl.ref_budget": 3000, "bcd.targets": [2600, 2200],
        "snl.epochs": 1, "snl.target_epochs": 1, "snl.lambda0": 1e-3, "snl.finetune_epochs": 0})
    monkeypatch.setitem(fidelity.SIZES, "smoke", {"drc": 400, "subset": 128, "steps": 2, "target_epochs": 1,
                                                  "paper_rt": 2, "paper_subset": 128, "paper_steps": 2,
                                                  "settled_epochs": 1})
    out = tmp_path / "out"
    payload = fidelity.main(["--data", str(data), "--scale", "smoke", "--out", str(out), "--device", "cpu"])
    keys = {(r["arm"], r["method"], r["budget"]) for r in payload["rows"]}
    assert keys == {(a, m, b) for a in fidelity.ARMS for m in ("BCD", "SNL") for b in (2600, 2200)}
    assert [(g["arm"], g["budget"]) for g in payload["gaps"]] == [(a, b) for b in (2600, 2200) for a in fidelity.ARMS]
    assert all(g["test_paired_se"] >= 0 for g in payload["gaps"])
    assert payload["test_images"] == len(digits.target) - 1400
    assert set(payload["starts"]) == {f"seed0/{s}" for s in fidelity.STARTS}
    assert json.loads((out / "fidelity_smoke.json").read_text())["scale"] == "smoke"
    assert "| 2200 | polynomial | SNL | 1 |" in (out / "fidelity_smoke.md").read_text()
    assert (out / "fidelity_smoke.png").stat().st_size > 0
