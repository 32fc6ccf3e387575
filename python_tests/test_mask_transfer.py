"""bench/mask_transfer.py: both methods' masks go on the same starting weights and get the same finetune, so two equal
masks give equal rows, and every budget both methods reached is measured."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import bench_script
from test_cli import TINY

from fastmask import cli


def mask_transfer():
    return bench_script("mask_transfer")


@pytest.fixture(scope="module")
def both_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("both") / "run"
    assert cli.main(TINY + ["--out", str(out), "--method", "both", "--snl-target-epochs", "1"]) == 0
    return out


def test_rows_for_every_budget_both_methods_reached(both_run, tmp_path):
    payload = mask_transfer().main([str(both_run), "--epochs", "1", "--out", str(tmp_path)])
    assert [(r["budget"], r["mask"]) for r in payload["rows"]] == [(2600, "BCD"), (2600, "SNL"), (2200, "BCD"),
                                                                  (2200, "SNL")]
    assert payload["start"] == str(both_run / "snl" / "model.safetensors")
    for row in payload["rows"]:
        assert sum(site["kept"] for site in row["per_site"]) == row["budget"]
        assert row["train_images"] > 0
    assert json.loads((tmp_path / "mask_transfer.json").read_text())["rows"][0]["mask"] == "BCD"
    text = (tmp_path / "mask_transfer.md").read_text()
    assert "| 2200 | SNL |" in text and "ReLUs kept per site at 2200" in text
    layouts = payload["estimate_layouts"]["estimate"]
    assert [sum(layouts[b]) for b in (2600, 2200)] == [2600, 2200]
    assert layouts[2600] != layouts[2200]


def test_equal_masks_give_equal_rows(both_run, tmp_path):
    """SNL's folder given BCD's mask: whatever differs between the rows could only come from the training."""
    run = tmp_path / "run"
    shutil.copytree(both_run, run)
    shutil.copy(run / "targets" / "2200" / "masks.safetensors", run / "snl_targets" / "2200" / "masks.safetensors")
    rows = mask_transfer().main([str(run), "--budgets", "2200", "--epochs", "1"])["rows"]
    assert rows[0]["mask"] == "BCD" and rows[1]["mask"] == "SNL"
    assert rows[0]["val_acc"] == rows[1]["val_acc"] and rows[0]["test_acc"] == rows[1]["test_acc"]


def test_a_run_without_both_methods_is_refused(both_run, tmp_path):
    from fastmask.errors import FastmaskError

    run = tmp_path / "run"
    shutil.copytree(both_run, run)
    shutil.rmtree(run / "snl_targets")
    with pytest.raises(FastmaskError, match="no budget with both"):
        mask_transfer().main([str(run)])


def test_snl_masks_from_another_run_of_the_same_start(both_run, tmp_path):
    bcd_only = tmp_path / "bcd_only"
    shutil.copytree(both_run, bcd_only)
    shutil.rmtree(bcd_only / "snl_targets")
    payload = mask_transfer().main([str(bcd_only), "--snl-run", str(both_run), "--budgets", "2200", "--epochs", "1",
                                    "--out", str(tmp_path)])
    assert [r["mask"] for r in payload["rows"]] == ["BCD", "SNL"] and payload["snl_run"] == str(both_run)
    assert f"SNL's masks from {both_run}" in (tmp_path / "mask_transfer.md").read_text()

    from fastmask.errors import FastmaskError

    other_start = tmp_path / "other_start"
    shutil.copytree(both_run, other_start)
    shutil.copy(other_start / "baseline" / "model.safetensors", other_start / "snl" / "model.safetensors")
    with pytest.raises(FastmaskError, match="started from"):
        mask_transfer().main([str(bcd_only), "--snl-run", str(other_start)])
