"""fastmask/report.py: report.md carries every model's ReLUs, sites, MACs, accuracy and per-protocol cost; mask IoU
agrees with a plain count on hand-made masks; every plot is written."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fastmask import cost, report


def plain_iou(a: dict, b: dict) -> float:
    """The reference: kept positions as Python sets of (site, flat index)."""
    def kept(masks: dict) -> set:
        return {(k, i) for k, t in masks.items() for i, v in enumerate(t.reshape(-1).tolist()) if v}

    x, y = kept(a), kept(b)
    return len(x & y) / len(x | y) if x | y else 1.0


def test_mask_iou_matches_a_plain_count():
    g = torch.Generator().manual_seed(0)
    a = {"s0": torch.rand(2, 3, 3, generator=g) > 0.5, "s1": torch.rand(4, 2, 2, generator=g) > 0.3}
    b = {"s0": torch.rand(2, 3, 3, generator=g) > 0.5, "s1": torch.rand(4, 2, 2, generator=g) > 0.7}
    assert report.mask_iou(a, b) == pytest.approx(plain_iou(a, b))
    assert report.mask_iou(a, a) == 1.0
    disjoint = {k: ~v for k, v in a.items()}
    assert report.mask_iou(a, disjoint) == 0.0
    assert report.mask_iou(a, {"s0": a["s0"]}) is None  # another architecture


def per_site(masks: dict) -> list[dict]:
    return [{"site": k, "shape": list(t.shape), "kept": int(t.sum()), "total": t.numel()} for k, t in masks.items()]


def fake_cost(relus: int, sites: int) -> dict:
    """A cost field shaped as cost.summary's, with every protocol cost.PROTOCOLS has."""
    load = cost.Workload(kept=tuple([relus // sites] * sites), products=(0,) * sites,
                         linear=(cost.LinearLayer("conv", 100, 27, 1_234_567),))
    return cost.summary(load)


@pytest.fixture
def fake_run(tmp_path) -> tuple[Path, dict]:
    """An out dir with two BCD and two SNL target masks (two sites) and a summary that names them."""
    g = torch.Generator().manual_seed(1)
    summary = {"baseline": {"relu_count": 48, "val_acc": 90.0, "test_acc": 89.5, "cost": fake_cost(48, 2)},
               "snl": {"budget": 40, "relu_count": 40, "val_acc": 88.0, "test_acc": 87.0, "cost": fake_cost(40, 2)},
               "start": {"relu_count": 40, "val_acc": 88.0, "test_acc": 87.0, "cost": fake_cost(40, 2)},
               "targets": [], "snl_targets": []}
    for key in ("targets", "snl_targets"):
        for budget in (30, 20):
            masks = {"s0": torch.rand(4, 2, 2, generator=g) < budget / 48,
                     "s1": torch.rand(8, 2, 2, generator=g) < budget / 48}
            folder = tmp_path / key / str(budget)
            folder.mkdir(parents=True)
            save_file({k: v.to(torch.uint8) for k, v in masks.items()}, str(folder / "masks.safetensors"))
            summary[key].append({"budget": budget, "val_acc": 80.0 + budget / 10, "test_acc": 79.0 + budget / 10,
                                 "per_site": per_site(masks), "cost": fake_cost(budget, 2)})
    summary["snl_points"] = [summary["snl"]] + summary["snl_targets"]
    return tmp_path, summary


def test_report_has_the_latency_columns_the_iou_and_the_plots(fake_run):
    out, summary = fake_run
    written = report.write_report(out, summary, [])
    names = {str(p.relative_to(out)) for p in written}
    for name in ["report.md", "summary.json", "plots/accuracy_vs_budget.png", "plots/accuracy_vs_latency.png",
                 "plots/per_site_30.png", "plots/per_site_bcd_vs_snl_30.png", "plots/per_site_bcd_vs_snl_20.png",
                 "plots/mask_iou.png"]:
        assert name in names and (out / name).stat().st_size > 0, name

    text = (out / "report.md").read_text()
    assert "| method | target | ReLUs | non-empty sites | plaintext MACs | val acc (%) | test acc (%) |" in text
    assert "1,234,567" in text  # thousands separators
    for protocol in cost.PROTOCOLS:
        assert f"## {protocol}" in text
    assert "| method | target | ReLUs | bytes | rounds | LAN (s) | WAN (s) | test acc (%) |" in text
    assert text.count("| BCD |") == 2 + 2 * len(cost.PROTOCOLS)  # two targets in every table

    saved = json.loads((out / "summary.json").read_text())
    iou = saved["mask_iou"]
    assert iou["masks"] == ["BCD 30", "BCD 20", "SNL 30", "SNL 20"]
    assert all(iou["matrix"][i][i] == 1.0 for i in range(4))
    assert set(iou["bcd_vs_snl"]) == {"30", "20"}
    bcd, snl = (report.read_masks(out / key / "20" / "masks.safetensors") for key in ("targets", "snl_targets"))
    assert iou["bcd_vs_snl"]["20"] == pytest.approx(plain_iou(bcd, snl), abs=1e-4)
    assert "## Mask IoU" in text and "BCD against SNL at the same budget" in text
    per_site_rows = text.split("## Kept ReLUs per site")[1].split("## Mask IoU")[0]
    assert "| site | total | BCD 30 | BCD 20 | SNL 30 | SNL 20 |" in per_site_rows
    kept = [t["per_site"][1]["kept"] for t in summary["targets"] + summary["snl_targets"]]
    assert "| s1 | 32 | " + " | ".join(map(str, kept)) + " |" in per_site_rows


def test_seconds_read_with_three_significant_digits():
    assert [report._seconds(v) for v in (0.012345, 1.2345, 12.345, 1234.5, None)] == \
        ["0.0123", "1.23", "12.3", "1,234", "–"]


def test_a_summary_without_costs_or_masks_still_reports(tmp_path):
    """Runs made before the cost field: the table leaves the cost cells empty, no latency plot, no IoU."""
    summary = {"targets": [{"budget": 20, "val_acc": 50.0, "test_acc": 49.0,
                            "per_site": [{"site": "s0", "shape": [2], "kept": 2, "total": 2}]}]}
    written = {p.name for p in report.write_report(tmp_path, summary, [])}
    assert "accuracy_vs_latency.png" not in written and "mask_iou.png" not in written
    assert "| BCD | 20 | 20 | 1 | – | 50.00 | 49.00 |" in (tmp_path / "report.md").read_text()


def test_remake_report_costs_saved_models_and_keeps_the_step_table(tmp_path):
    """A run made before entries carried their cost: remake_report costs its saved models and writes the report
    again, steps.csv unchanged."""
    import fastmask as fm
    from fastmask.checkpoint import save_model

    model = fm.models.create("resnet18", 10, 8, width=2, in_channels=1)
    save_model(model, tmp_path / "targets" / "20" / "model.safetensors")
    summary = {"targets": [{"budget": 20, "val_acc": 50.0, "test_acc": 49.0, "per_site": fm.MaskSet(model).per_site()}],
               "config": {"bcd": {"adt": 0.5, "criterion": "accuracy"}}}
    history = [{"step": 1, "budget_after": 20, "accepted_drop": 0.25, "fallback": False, "val_acc": None},
               {"step": 2, "budget_after": 20, "accepted_drop": 0.75, "fallback": True, "val_acc": 50.0}]
    report.write_report(tmp_path, summary, history)
    steps = (tmp_path / "steps.csv").read_bytes()
    written = {p.name for p in report.remake_report(tmp_path)}
    assert {"accuracy_vs_latency.png", "accepted_drop.png", "report.md"} <= written
    assert (tmp_path / "steps.csv").read_bytes() == steps
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["targets"][0]["cost"] == cost.summary(cost.workload(model))
