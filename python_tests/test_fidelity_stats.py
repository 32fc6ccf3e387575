"""bench/fidelity.py's gap statistics: BCD minus SNL per seed, and the paired test-set standard error."""
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
