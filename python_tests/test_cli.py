"""fastmask-linearize (fastmask/cli.py): every bad input fails in one line with nothing written; a tiny run makes
every output; config precedence (defaults < YAML < flags); --resume of a finished run changes nothing."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml

import fastmask as fm
from fastmask import cli, cost, train
from fastmask import config as settings
from fastmask.checkpoint import save_model
from fastmask.pipeline import Pipeline

# digits at width 4: 7,680 ReLUs; everything tiny so a whole run takes seconds.
TINY = ["--width", "4", "--baseline-epochs", "1", "--ref-budget", "3000", "--targets", "2600,2200", "--drc", "400",
        "--rt", "2", "--finetune-epochs", "1", "--snl-epochs", "1", "--snl-finetune-epochs", "0",
        "--score-subset", "128", "--adt", "5", "--finetune-target-epochs", "1", "--quiet"]


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def other_run(tmp_path) -> Path:
    """An out dir that already holds a different run."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.yaml").write_text(yaml.safe_dump({"dataset": "digits", "targets": [1000], "drc": 7}))
    (out / "steps.csv").write_text("step\n1\n")
    return out


def checkpoint_of(tmp_path, arch="resnet18", classes=10, width=4) -> Path:
    path = tmp_path / f"{arch}_{classes}_{width}.safetensors"
    save_model(fm.models.create(arch, classes, 16, width=width, in_channels=1), path)
    return path


def fails(argv, capsys, other_run, expected: str) -> None:
    before = snapshot(other_run)
    code = cli.main(argv + ["--out", str(other_run)])
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert len(err.splitlines()) == 1 and err.startswith("fastmask-linearize: error: "), err
    assert expected.lower() in err.lower(), err
    assert snapshot(other_run) == before


@pytest.mark.parametrize("argv, expected", [
    (["--ref-budget", "9000", "--targets", "8000"], "at or above the ReLU count"),
    (["--targets", "3500"], "at or above the reference budget"),
    (["--drc", "0"], "drc must be > 0"),
    (["--rt", "-2"], "rt must be > 0"),
    (["--finetune-epochs", "0"], "finetune-epochs must be > 0"),
    (["--adt", "-0.5"], "adt must be >= 0"),
    (["--targets", "1000,2000"], "strictly descending"),
    (["--targets", "1000,1000"], "strictly descending"),
    (["--dataset", "imagenet-42"], "unknown dataset"),
    (["--dataset", "cifar10", "--data-dir", "/nonexistent/fastmask-data", "--targets", "10"], "does not exist"),
    (["--checkpoint", "/nonexistent/model.safetensors"], "does not exist"),
    (["--criterion", "f1"], "invalid choice"),
    ([], "holds a different run"),
    (["--restore", "0.5"], "unrecognized arguments: --restore"),
])
def test_bad_input_is_one_line_nonzero_and_writes_nothing(argv, expected, capsys, other_run):
    fails(["--width", "4"] + argv, capsys, other_run, expected)


def test_a_run_of_an_older_version_is_named_as_such(tmp_path, capsys, other_run):
    old = tmp_path / "old"
    old.mkdir()
    (old / "config.yaml").write_text(yaml.safe_dump({"bcd": {"targets": [1000], "restore": 0.0, "quota": "none"}}))
    before = snapshot(old)
    assert cli.main(["--out", str(old), "--resume"]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "another fastmask version" in err and "bcd.quota, bcd.restore" in err, err
    assert snapshot(old) == before


def test_checkpoint_of_another_arch_or_class_count_or_corrupt(tmp_path, capsys, other_run):
    wrn = checkpoint_of(tmp_path, arch="wide_resnet22_8", width=8)
    fails(["--checkpoint", str(wrn), "--arch", "resnet18"], capsys, other_run, "arch")
    five = checkpoint_of(tmp_path, classes=5)
    fails(["--checkpoint", str(five)], capsys, other_run, "num_classes")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00\x01 not a safetensors file" * 10)
    fails(["--checkpoint", str(corrupt)], capsys, other_run, "corrupt")


def test_yaml_values_hold_unless_a_flag_overrides(tmp_path):
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump({"drc": 123, "rt": 9, "targets": "2500,1000", "width": 4}))
    config, _, _ = cli.parse(["--config", str(config_file), "--rt", "4", "--out", str(tmp_path / "o")])
    assert config.bcd.drc == 123  # not reset by the flag default
    assert config.bcd.rt == 4  # the flag wins
    assert config.bcd.targets == [2500, 1000] and config.model.width == 4
    assert config.bcd.adt == settings.PRESETS["demo"]["bcd.adt"]  # the digits demo default fills what neither gave
    Pipeline.prepare(config, log=lambda message: None)
    assert not (tmp_path / "o").exists()  # preparing writes nothing


# One value per setting that differs from every default and preset: each flag must survive config.yaml.
SAMPLE = {"dataset": "cifar100", "data-dir": "some/folder", "val-size": "500", "image-size": "24",
          "mean": "0.4,0.5,0.6", "std": "0.2,0.25,0.3", "arch": "wide_resnet22_8",
          "width": "16", "checkpoint": "m.safetensors", "teacher": "t.safetensors", "baseline-epochs": "7",
          "ref-budget": "9000", "snl-epochs": "11", "snl-lr": "0.002", "snl-lambda0": "0.0003",
          "snl-lambda-growth": "1.2", "snl-threshold": "0.05", "snl-stall-patience": "3", "snl-finetune-epochs": "4",
          "targets": "8k,5000", "drc": "17", "rt": "19", "adt": "0.7", "criterion": "loss",
          "score-subset": "333",
          "score-batch-size": "64", "finetune-epochs": "6", "finetune-optimizer": "sgd", "finetune-lr": "0.0002",
          "finetune-max-steps": "9", "finetune-step-schedule": "fresh",
          "finetune-target-epochs": "2", "seed": "5", "device": "cpu", "out": "somewhere", "snl-target-epochs": "12",
          "proposal": "uniform", "pool": "2.5", "temperature": "0.25", "scoring": "exact",
          "race-eta": "3", "cost": "latency", "network": "200,20", "protocol": "crypten-secret",
          "latency-targets": "3.5,2.5s",
          # latency targets are BCD's alone: the one method that takes them
          "method": "bcd", "replacement": "polynomial"}


def test_every_setting_is_a_flag_and_round_trips_through_config_yaml(tmp_path):
    assert sorted(SAMPLE) == sorted(s.flag for s in settings.SETTINGS.values())
    argv = [part for flag, value in SAMPLE.items() for part in ("--" + flag, value)]
    config, _, _ = cli.parse(argv)
    for s in settings.SETTINGS.values():  # every flag landed in its own field, converted
        assert settings.get(config, s.path) == s.convert(SAMPLE[s.flag]), s.flag
    path = tmp_path / "config.yaml"
    path.write_text(settings.dump(config))
    assert settings.load_saved(path) == config
    again, _, _ = cli.parse(["--config", str(path)])
    assert again == config
    help_text = cli.build_parser().format_help()
    assert all(f"--{s.flag}" in help_text for s in settings.SETTINGS.values())


def test_a_yaml_null_clears_a_preset_value_and_bad_numbers_are_one_line(tmp_path, capsys, other_run):
    config_file = tmp_path / "run.yaml"
    config_file.write_text("snl:\n  ref_budget: null\nmodel:\n  width: 4\n")
    config, _, _ = cli.parse(["--config", str(config_file)])
    assert config.snl.ref_budget is None and config.bcd.targets == settings.PRESETS["demo"]["bcd.targets"]
    fails(["--drc", "inf"], capsys, other_run, "drc must be a whole number")
    fails(["--val-size", "1.5"], capsys, other_run, "val-size must be a fraction below 1 or a whole count")


def test_paper_preset_is_algorithm_2():
    config, _, _ = cli.parse(["--preset", "paper", "--dataset", "cifar10", "--targets", "15000"])
    assert (config.bcd.drc, config.bcd.rt, config.bcd.adt, config.bcd.criterion, config.bcd.score_subset) == \
        (100, 50, 0.3, "accuracy", 0)
    assert (config.bcd.proposal, config.bcd.scoring, config.replacement, config.method) == \
        ("uniform", "exact", "identity", "bcd")
    assert config.finetune.epochs_for("cifar10") == 20 and config.finetune.epochs_for("tinyimagenet") == 5
    assert (config.snl.lr, config.snl.lambda0, config.snl.finetune_epochs) == (1e-3, 1e-5, 100)
    assert (config.finetune.step_schedule, config.finetune.target_epochs) == ("fresh", 0)
    # the paper's finetune recipe per architecture: SGD 1e-3 for resnet18, Adam 3.5e-5 for WRN-22-8
    f = config.finetune
    recipes = {arch: train.finetune_config(arch, f.epochs_for("cifar10"), lr=f.lr, optimizer=f.optimizer)
               for arch in ("resnet18", "wide_resnet22_8")}
    assert [(r.optimizer, r.lr, r.epochs) for r in recipes.values()] == [("sgd", 1e-3, 20), ("adam", 3.5e-5, 20)]


def test_the_default_search_is_the_one_measured_best():
    """bench/FIDELITY.md's continuous arm, where its settings do not depend on the scale."""
    config, _, _ = cli.parse(["--dataset", "cifar10", "--targets", "15000"])
    b, f = config.bcd, config.finetune
    assert (b.proposal, b.scoring, b.rt, b.adt, b.pool, b.temperature) == ("informed", "race", 2, 0.3, 4.0, 0.5)
    assert (f.optimizer, f.lr, f.step_schedule, f.target_epochs) == ("adam", 1e-3, "continuous", 10)
    assert (b.drc, b.score_subset, f.epochs_for("cifar10"), config.snl.finetune_epochs) == (100, 0, 20, 100)


# Options that measured nothing and left the product (bench/FIDELITY.md records each, with its commit).
REMOVED = ("drc-fraction", "removal", "quota", "estimate-from", "concentrate", "restore", "estimate")


def test_the_removed_options_are_nowhere():
    help_text = cli.build_parser().format_help()
    dumped = settings.dump(settings.resolve({}))
    for flag in REMOVED:
        assert f"--{flag} " not in help_text and f"--{flag}\n" not in help_text, flag
        assert f"  {flag.replace('-', '_')}:" not in dumped and f"\n{flag.replace('-', '_')}:" not in dumped, flag
    assert "signed" not in help_text


def test_warnings_are_one_line_and_the_printer_is_restored(capsys):
    import warnings

    before = warnings.showwarning
    with cli.one_line_warnings():
        warnings.warn("ADT is low", RuntimeWarning, stacklevel=1)
    assert warnings.showwarning is before
    assert capsys.readouterr().err == "[fastmask-linearize] warning: ADT is low\n"


def test_unknown_yaml_setting_is_an_error(tmp_path, capsys, other_run):
    config_file = tmp_path / "run.yaml"
    config_file.write_text("dcr: 10\n")
    fails(["--config", str(config_file)], capsys, other_run, "unknown settings")


def test_tiny_run_makes_every_output_and_resume_of_a_finished_run_changes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(TINY + ["--out", str(out)]) == 0
    expected = ["config.yaml", "steps.csv", "summary.json", "checkpoints/last.pt", "baseline/model.safetensors",
                "snl/model.safetensors", "plots/accuracy_vs_budget.png", "plots/accepted_drop.png", "report.md",
                "plots/accuracy_vs_latency.png", "plots/mask_iou.png"]
    for budget in (2600, 2200):
        expected += [f"targets/{budget}/model.safetensors", f"targets/{budget}/masks.safetensors",
                     f"targets/{budget}/masks.safetensors.json", f"plots/per_site_{budget}.png"]
    for name in expected:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name

    rows = list(csv.DictReader((out / "steps.csv").open()))
    assert [int(r["budget_after"]) for r in rows] == [2600, 2200]
    assert all(r["ref_acc"] and r["tries_scored"] and r["val_acc"] and r["seconds"] for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert [t["budget"] for t in summary["targets"]] == [2600, 2200]
    assert all(0 <= t["test_acc"] <= 100 and 0 <= t["val_acc"] <= 100 for t in summary["targets"])
    assert summary["snl"]["budget"] == 3000 and summary["start"]["relu_count"] == 3000
    assert [t["cost"]["relus"] for t in summary["targets"]] == [2600, 2200]
    assert summary["mask_iou"]["masks"] == ["BCD 2600", "BCD 2200"] and summary["mask_iou"]["bcd_vs_snl"] == {}
    if "gpu" not in summary["machine"]:  # scored on the CPU: the pass sizes it chose
        assert all(p["rows"] >= 1 for p in summary["machine"]["cpu_scoring_passes"])
    model = fm.checkpoint.load_model(out / "targets" / "2200" / "model.safetensors")
    assert fm.relu_count(model) == 2200
    assert yaml.safe_load((out / "config.yaml").read_text())["bcd"]["targets"] == [2600, 2200]

    masks_before = (out / "targets/2200/masks.safetensors").read_bytes()
    capsys.readouterr()
    assert cli.main(TINY + ["--out", str(out), "--resume"]) == 0
    assert "baseline: loaded" in capsys.readouterr().out
    assert (out / "targets/2200/masks.safetensors").read_bytes() == masks_before
    # the same run again without --resume is refused
    assert cli.main(TINY + ["--out", str(out)]) != 0


@pytest.mark.parametrize("stop_after, written, absent", [("baseline", "baseline", "snl"), ("snl", "snl", "targets")])
def test_a_run_stopped_before_the_search_resumes_to_the_uninterrupted_run(tmp_path, capsys, stop_after, written,
                                                                          absent):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert cli.main(TINY + ["--out", str(whole)]) == 0
    config, _, _ = cli.parse(TINY + ["--out", str(parts)])
    summary = Pipeline.prepare(config, log=lambda message: None).run(stop_after=stop_after)
    assert (parts / written / "model.safetensors").is_file() and not (parts / absent).exists()
    assert "targets" not in summary and not (parts / "summary.json").exists()
    capsys.readouterr()
    assert cli.main(TINY + ["--out", str(parts), "--resume"]) == 0
    assert f"{'baseline' if stop_after == 'baseline' else 'SNL'}: loaded" in capsys.readouterr().out
    for budget in (2600, 2200):
        name = f"targets/{budget}/masks.safetensors"
        assert (parts / name).read_bytes() == (whole / name).read_bytes()
    with pytest.raises(ValueError, match="stop_after"):
        Pipeline.prepare(config, resume=True, log=lambda message: None).run(stop_after="bcd")


def test_continuous_step_finetunes_write_their_optimizer_into_the_state(tmp_path, capsys):
    out = tmp_path / "continuous"
    assert cli.main(TINY + ["--out", str(out), "--finetune-step-schedule", "continuous"]) == 0
    assert "--finetune-step-schedule continuous" in capsys.readouterr().out  # the run logs its settings
    from safetensors import safe_open

    with safe_open(str(out / "checkpoints" / "last.pt"), framework="pt") as f:
        moments = [k for k in f.keys() if k.startswith("optimizer.") and k.endswith(".exp_avg_sq")]  # Adam's
        state = json.loads(f.metadata()["bcd_state"])
    assert moments and state["config"]["step_schedule"] == "continuous"
    assert [t["budget"] for t in state["targets"]] == [2600, 2200]


def test_method_both_gives_snl_the_compute_bcd_spent(tmp_path):
    """--method both: SNL goes from the same B_ref model to each target and trains on at least as many images as BCD
    trained on and pushed forward to reach it (within one batch); both curves are in the report."""
    out = tmp_path / "both"
    assert cli.main(TINY + ["--out", str(out), "--method", "both", "--snl-target-epochs", "1"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [t["budget"] for t in summary["snl_targets"]] == [2600, 2200]
    for bcd_target, snl_target in zip(summary["targets"], summary["snl_targets"]):
        bcd_total = bcd_target["train_images"] + bcd_target["forward_images"]
        snl_total = snl_target["train_images"] + snl_target["forward_images"]
        assert bcd_total <= snl_total < bcd_total + 128
        model = fm.checkpoint.load_model(out / "snl_targets" / str(snl_target["budget"]) / "model.safetensors")
        assert fm.relu_count(model) == snl_target["budget"]
    assert summary["compute"]["bcd"]["forward_images"] > 0
    for t in summary["snl_targets"]:
        assert t["alpha_images"] > 0 and t["alpha_images"] + t["finetune_images"] == t["train_images"]
        assert summary["compute"]["snl_per_target"][str(t["budget"])]["train_images"] == t["train_images"]
    rows = list(csv.DictReader((out / "steps.csv").open()))
    assert sum(int(r["forward_images"]) for r in rows) == summary["compute"]["bcd"]["forward_images"]
    # the report speaks latency: every model carries its predicted cost, which the table and the plots read
    for entry in summary["targets"] + summary["snl_targets"] + [summary["baseline"], summary["snl"], summary["start"]]:
        assert entry["cost"]["relus"] == entry.get("relu_count", entry.get("budget"))
        assert set(entry["cost"]["protocols"]) == set(cost.PROTOCOLS)
    assert summary["targets"][-1]["cost"]["protocols"]["crypten-public"]["wan_seconds"] < \
        summary["baseline"]["cost"]["protocols"]["crypten-public"]["wan_seconds"]
    assert set(summary["mask_iou"]["bcd_vs_snl"]) == {"2600", "2200"}
    assert all(0 <= v <= 1 for v in summary["mask_iou"]["bcd_vs_snl"].values())
    for name in ["report.md", "plots/accuracy_vs_latency.png", "plots/mask_iou.png",
                 "plots/per_site_bcd_vs_snl_2600.png", "plots/per_site_bcd_vs_snl_2200.png"]:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert "| BCD | 2,200 | 2,200 |" in (out / "report.md").read_text()


def test_polynomial_replacement_is_fitted_trained_and_saved(tmp_path):
    out = tmp_path / "poly"
    assert cli.main(TINY + ["--out", str(out), "--replacement", "polynomial", "--snl-finetune-epochs", "1"]) == 0
    reference = fm.checkpoint.load_model(out / "snl" / "model.safetensors")
    target = fm.checkpoint.load_model(out / "targets" / "2200" / "model.safetensors")
    assert target.fastmask_spec["polynomial"] and fm.relu_count(target) == 2200
    for (name, a), (_, b) in zip(fm.masked_sites(reference), fm.masked_sites(target)):
        if name.endswith("relu2"):  # after the residual add: the identity
            assert a.coeffs is None and b.coeffs is None
            continue
        assert a.coeffs is not None and not torch.equal(a.coeffs, torch.tensor([[0.0, 1.0, 0.0]]).expand_as(a.coeffs))
        assert not torch.equal(a.coeffs, b.coeffs)  # BCD's finetunes train them further


def test_python_dash_m_entry_point_exists():
    import fastmask.__main__ as entry

    assert entry.main is cli.main


def test_pi_finds_every_model_folder_of_a_run_and_files_its_rows_there(tmp_path):
    from fastmask.pi.commands import run_model
    from fastmask.report import attach_pi

    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({"targets": [{"budget": 1200}, {"budget": 600}],
                                                  "snl_targets": [{"budget": 1200}], "snl": {"budget": 3000}}))
    rows = [{"role": "model", "bytes": 7}]
    for folder, section, budget in (("targets/600", "targets", 600), ("snl_targets/1200", "snl_targets", 1200),
                                    ("snl", "snl", None)):
        found = run_model(run / folder / "model.safetensors")
        assert (found.run_dir, found.section, found.budget) == (run.resolve(), section, budget)
        attach_pi(found.run_dir, found.section, found.budget, rows)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["targets"][1]["pi"] == rows and "pi" not in summary["targets"][0]
    assert summary["snl_targets"][0]["pi"] == rows and summary["snl"]["pi"] == rows
    for elsewhere in ("baseline/model.safetensors", "model.safetensors", "targets/abc/model.safetensors"):
        assert run_model(run / elsewhere) is None
    assert run_model(tmp_path / "loose" / "targets" / "5" / "model.safetensors") is None  # no summary.json there
