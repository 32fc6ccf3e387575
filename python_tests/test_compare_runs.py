"""bench/compare_runs.py: two run folders are the same when their masks, models (timings aside), step tables (timings
aside) and target summaries are; any one of them differing is found."""
import json
import shutil
from pathlib import Path

import torch
from helpers import bench_script

import fastmask as fm
from fastmask import report
from fastmask.checkpoint import save_model


def compare_runs():
    return bench_script("compare_runs")


def make_run(folder: Path, seconds: float) -> Path:
    torch.manual_seed(0)
    model = fm.models.create("resnet18", 10, 8, width=2, in_channels=1)
    save_model(model, folder / "baseline" / "model.safetensors", extra={"val_acc": 50.0, "seconds": seconds})
    masks = fm.MaskSet(model)
    masks.remove(masks.sample(100, torch.Generator().manual_seed(1)))
    save_model(model, folder / "targets" / "860" / "model.safetensors", extra={"relu_count": 860})
    masks.save(folder / "targets" / "860" / "masks.safetensors")
    report.write_steps_csv(folder / "steps.csv", [{"step": 1, "budget_after": 860, "ref_acc": 51.5,
                                                   "seconds": seconds}])
    report.write_json(folder / "summary.json", {"targets": [{"budget": 860, "val_acc": 40.0, "test_acc": 41.0}],
                                                "seconds": seconds})
    return folder


def test_runs_that_differ_in_timings_alone_are_the_same(tmp_path, capsys):
    before, after = make_run(tmp_path / "a", 1.0), make_run(tmp_path / "b", 2.0)
    assert all(same for _, same in compare_runs().compare(before, after))
    assert compare_runs().main([str(before), str(after)]) == 0
    assert capsys.readouterr().out.strip().endswith("identical")


def test_every_kind_of_difference_is_found(tmp_path):
    tool = compare_runs()
    before = make_run(tmp_path / "before", 1.0)

    def changed(name: str, change) -> list[str]:
        after = tmp_path / name
        shutil.copytree(before, after)
        change(after)
        return [item for item, same in tool.compare(before, after) if not same]

    def flip_a_mask(run: Path) -> None:
        model = fm.checkpoint.load_model(run / "targets" / "860" / "model.safetensors")
        masks = fm.MaskSet(model)
        masks.remove(masks.present()[:1])
        masks.save(run / "targets" / "860" / "masks.safetensors")

    def nudge_a_weight(run: Path) -> None:
        model = fm.checkpoint.load_model(run / "targets" / "860" / "model.safetensors")
        with torch.no_grad():
            model.linear.bias[0] += 1e-6
        save_model(model, run / "targets" / "860" / "model.safetensors", extra={"relu_count": 860})

    def another_reference(run: Path) -> None:
        path = run / "steps.csv"
        path.write_text(path.read_text().replace("51.5", "51.6"))

    def another_accuracy(run: Path) -> None:
        summary = json.loads((run / "summary.json").read_text())
        summary["targets"][0]["test_acc"] = 41.5
        report.write_json(run / "summary.json", summary)

    assert changed("masks", flip_a_mask) == ["targets/860/masks.safetensors"]
    assert changed("weights", nudge_a_weight) == ["targets/860/model.safetensors"]
    assert changed("steps", another_reference) == ["steps.csv (1 steps, 22 columns, timings left out)"]
    assert changed("summary", another_accuracy) == ["summary.json target 860"]
    assert tool.main([str(before), str(tmp_path / "masks")]) == 1
