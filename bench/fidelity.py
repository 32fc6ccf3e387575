"""Fidelity: fastmask's default search against SNL at equal compute, beside the paper's Algorithm 2 and the
polynomial replacement (the results: bench/FIDELITY.md).

    python bench/fidelity.py --data cifar10_subset.npz --scale small --seeds 0,1,2   # CPU: hours
    python bench/fidelity.py --data cifar10_subset.npz --scale smoke                 # minutes: checks the script

Per seed, every run is a fastmask.pipeline run. Three starts, each made once: "identity" trains the baseline (every
run's teacher) and runs SNL to B_ref with the scale's short SGD finetune; "settled" redoes SNL to B_ref from that
baseline with a longer finetune at SGD 1e-2, so both methods start from a model recovered from SNL's binarization;
"settled-polynomial" is settled with the polynomial replacement. Three arms, each --method both (BCD through the
targets, then SNL from the same start straight to each target with the same compute: images trained on + images
pushed forward, SNL's alpha phase counted): "default", fastmask's default search written out, from settled; "paper",
Algorithm 2 (uniform candidates, exact scoring, fresh SGD finetunes, no target finetune) at the scale's DRC, RT and
finetune steps, from identity's SNL model; "polynomial", default with the polynomial on both sides, from
settled-polynomial. Nothing is chosen on test accuracy. Writes <name>.md, .json and .png into --out, the runs'
folders beside them. The 35 arms these three were kept from are at commit 6ce20bc (git show 6ce20bc:bench/fidelity.py).
"""
from __future__ import annotations

import argparse
import csv
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
from fastmask.search.compute import image_passes, images_spent  # noqa: E402

# Each scale's model, baseline and SNL, as fastmask.config paths.
SCALES = {
    # a few minutes: checks that the script runs end to end, numbers mean nothing
    "smoke": {"model.width": 8, "baseline.epochs": 1, "snl.ref_budget": 8000, "bcd.targets": [7000, 6000],
              "snl.epochs": 2, "snl.target_epochs": 1, "snl.lambda0": 3e-3, "snl.finetune_epochs": 0},
    # the results' scale: resnet18 width 16 (122,880 ReLUs), B_ref 6,000, targets 3,000 and 1,500
    "small": {"model.width": 16, "baseline.epochs": 15, "snl.ref_budget": 6000, "bcd.targets": [3000, 1500],
              "snl.epochs": 20, "snl.target_epochs": 8, "snl.lambda0": 1.1e-3, "snl.finetune_epochs": 2},
    # the paper's search sizes (DRC 100, RT 50, whole-train scoring): a GPU's work
    "full": {"model.width": 16, "baseline.epochs": 60, "snl.ref_budget": 6000, "bcd.targets": [3000, 1500],
             "snl.epochs": 60, "snl.target_epochs": 60, "snl.lambda0": 1.1e-3, "snl.finetune_epochs": 10},
}
# Each scale's search sizes: DRC; the default search's scoring images, finetune steps (of 128 images; None: an epoch)
# per BCD step and target finetune epochs; the paper arm's RT, scoring images and steps; the settled start's SNL
# finetune epochs. The default search scores on half the paper arm's images and trains twice as long per step.
SIZES = {
    "smoke": {"drc": 500, "subset": 128, "steps": 8, "target_epochs": 1,
              "paper_rt": 4, "paper_subset": 256, "paper_steps": 4, "settled_epochs": 1},
    "small": {"drc": 300, "subset": 1024, "steps": 36, "target_epochs": 10,
              "paper_rt": 8, "paper_subset": 2048, "paper_steps": 18, "settled_epochs": 12},
    "full": {"drc": 100, "subset": 0, "steps": None, "target_epochs": 20,
             "paper_rt": 50, "paper_subset": 0, "paper_steps": None, "settled_epochs": 20},
}
STARTS = ("identity", "settled", "settled-polynomial")
ARMS = ("default", "paper", "polynomial")
START_OF = {"default": "settled", "paper": "identity", "polynomial": "settled-polynomial"}


def run_settings(scale: str, root: Path) -> dict[str, dict]:
    """Each start's and arm's settings on top of the scale's, by run name (its folder in root). A path left out is
    fastmask's default; None is the config's null (finetune.optimizer/lr: the paper's, SGD 1e-3 for resnet18)."""
    size = SIZES[scale]
    baseline = str(root / "identity" / "baseline" / "model.safetensors")

    def snl_model(start: str) -> str:
        return str(root / start / "snl" / "model.safetensors")

    settled = {"model.checkpoint": baseline, "model.teacher": baseline, "snl.finetune_epochs": size["settled_epochs"],
               "finetune.optimizer": None, "finetune.lr": 1e-2}
    # fastmask's defaults but the scale's sizes, written out so that the arm stays what it measured if they move
    default = {"method": "both", "model.checkpoint": snl_model("settled"), "model.teacher": baseline,
               "replacement": "identity", "bcd.proposal": "informed", "bcd.scoring": "race", "bcd.drc": size["drc"],
               "bcd.rt": 2, "bcd.adt": 0.3, "bcd.criterion": "accuracy", "bcd.pool": 4.0, "bcd.temperature": 0.5,
               "bcd.score_subset": size["subset"], "finetune.optimizer": "adam", "finetune.lr": 1e-3,
               "finetune.step_schedule": "continuous", "finetune.epochs": 1, "finetune.max_steps": size["steps"],
               "finetune.target_epochs": size["target_epochs"]}
    return {
        "identity": {"finetune.optimizer": None, "finetune.lr": None},
        "settled": settled,
        # the polynomials are fitted on the paper arm's scoring images, then trained through SNL's alpha phase
        "settled-polynomial": {**settled, "replacement": "polynomial", "bcd.score_subset": size["paper_subset"]},
        "default": default,
        "paper": {"method": "both", "model.checkpoint": snl_model("identity"), "model.teacher": baseline,
                  "replacement": "identity", "bcd.proposal": "uniform", "bcd.scoring": "exact", "bcd.drc": size["drc"],
                  "bcd.rt": size["paper_rt"], "bcd.adt": 0.3, "bcd.criterion": "accuracy",
                  "bcd.score_subset": size["paper_subset"], "finetune.optimizer": None, "finetune.lr": None,
                  "finetune.step_schedule": "fresh", "finetune.epochs": 1, "finetune.max_steps": size["paper_steps"],
                  "finetune.target_epochs": 0},
        "polynomial": {**default, "model.checkpoint": snl_model("settled-polynomial"), "replacement": "polynomial"},
    }


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="an .npz dataset (x_train, y_train, x_test, y_test, classes)")
    p.add_argument("--scale", choices=sorted(SCALES), default="small")
    p.add_argument("--seeds", default="0", help="comma-separated seeds, e.g. 0,1,2")
    p.add_argument("--arms", default=",".join(ARMS), help=f"which of {', '.join(ARMS)} to run")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "fidelity"))
    p.add_argument("--name", default=None, help="the files' name in --out (default fidelity_<scale>)")
    return p.parse_args(argv)


def run(out: Path, settings: dict, stop_after: Optional[str] = None) -> dict:
    """One pipeline run in `out` (resumed when it is there), returning its summary; stop_after ("baseline", "snl")
    makes only a start, which later runs resume from."""
    if (out / "summary.json").is_file():
        print(f"reusing {out}", flush=True)
        return json.loads((out / "summary.json").read_text())
    # YAML values, not flags: a None there is the config's null, where a flag of None is a flag not given
    config = validate(resolve({"out": str(out)}, yaml_values=settings))
    return Pipeline.prepare(config, resume=out.exists(), progress=False,
                            log=lambda message: print(f"[{out.name}] {message}", flush=True)).run(stop_after)


def spread(values: list[float]) -> float:
    """The standard deviation over seeds (0 for one seed)."""
    return statistics.stdev(values) if len(values) > 1 else 0.0


def method_rows(summary: dict, arm: str, seed: int) -> list[dict]:
    """A --method both run's rows: one per method and target, with the images it spent to get there."""
    out = Path(summary["config"]["out"])
    with (out / "steps.csv").open() as f:
        steps = list(csv.DictReader(f))
    rows = []
    for method, key in (("BCD", "targets"), ("SNL", "snl_targets")):
        for t in summary.get(key, []):
            row = {"arm": arm, "method": method, "seed": seed, "budget": t["budget"], "test_acc": t["test_acc"],
                   "val_acc": t["val_acc"], **images_spent([t]), "seconds": t.get("seconds"), "fallbacks": None,
                   "run": str(out), "model": str(out / key / str(t["budget"]) / "model.safetensors")}
            if method == "BCD":  # the steps up to this target
                done = [r for r in steps if int(r["step"]) <= t["step"]]
                row["seconds"] = sum(float(r["seconds"]) for r in done)
                row["fallbacks"] = sum(r["fallback"] == "True" for r in done)
            rows.append(row)
    return rows


def aggregate(rows: list[dict]) -> list[dict]:
    """Mean and std over seeds per (arm, method, budget); images spent and wall time are means too."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["arm"], r["method"], r["budget"]), []).append(r)
    table = []
    for (arm, method, budget), group in groups.items():
        accs = [g["test_acc"] for g in group]
        table.append({"arm": arm, "method": method, "budget": budget, "seeds": len(group),
                      "test_mean": statistics.fmean(accs), "test_std": spread(accs),
                      "val_mean": statistics.fmean(g["val_acc"] for g in group),
                      **{key: total / len(group) for key, total in images_spent(group).items()},
                      "seconds": statistics.fmean(g["seconds"] for g in group),
                      "fallbacks": None if group[0]["fallbacks"] is None else
                      statistics.fmean(g["fallbacks"] for g in group)})
    return sorted(table, key=lambda r: (-r["budget"], ARMS.index(r["arm"]), r["method"]))


def gaps(rows: list[dict], correct: Optional[Callable[[dict], "torch.Tensor"]] = None) -> list[dict]:
    """BCD minus SNL per (arm, budget), seed by seed (both from the same start and seed), then mean and std. With
    `correct` (a row -> its model's per-test-image right/wrong), also the test-set standard error of the mean gap,
    paired by image (paired_standard_error). RuntimeError when an SNL row had fewer image passes than its BCD row."""
    by_key = {(r["arm"], r["budget"], r["seed"], r["method"]): r for r in rows}
    groups: dict[tuple, list[tuple[dict, dict]]] = {}
    for (arm, budget, seed, method), r in sorted(by_key.items()):
        snl = by_key.get((arm, budget, seed, "SNL"))
        if method == "BCD" and snl is not None:
            if image_passes([snl]) < image_passes([r]):
                raise RuntimeError(f"{arm}, seed {seed}, {budget} ReLUs: SNL had {image_passes([snl])} image passes, "
                                   f"fewer than BCD's {image_passes([r])}: not equal compute")
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
    (BCD right minus SNL right: -1, 0 or 1), averaged image by image over the seeds (all tested on the same images).
    Smaller than a binomial error per model when both get most images alike; it says how far the mean gap could move
    on another test set of this size, not on other seeds (the std does)."""
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
    s, size = p["settings"], p["sizes"]
    machine = p["machine"].get("gpu") or f"{p['machine']['cpu_threads']} CPU threads"
    lines = [f"## Fidelity, scale {p['scale']} ({p['data']}, resnet18 width {s['model.width']}, seeds "
             f"{','.join(map(str, p['seeds']))}; {machine})", "",
             f"B_ref {s['snl.ref_budget']}, DRC {size['drc']}; arms and sizes: bench/fidelity.py. SNL goes from each "
             "arm's start straight to each target and finetunes until it has spent BCD's images (train + forward). "
             f"Test standard error up to {p['test_standard_error_points_max']:.2f} points per seed.", "",
             "| ReLUs | arm | method | seeds | test % mean | std | val % | train images | forward images | wall s | "
             "fallbacks |",
             "| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in p["table"]:
        fallbacks = "" if r["fallbacks"] is None else f"{r['fallbacks']:.1f}"
        lines.append(f"| {r['budget']} | {r['arm']} | {r['method']} | {r['seeds']} | {r['test_mean']:.2f} | "
                     f"{r['test_std']:.2f} | {r['val_mean']:.2f} | {r['train_images']:,.0f} | "
                     f"{r['forward_images']:,.0f} | {r['seconds']:.0f} | {fallbacks} |")
    lines += ["", "BCD minus SNL, seed by seed (the same start and seed on both sides), in points:", "",
              "| ReLUs | arm | seeds | test gap | std | paired test SE | per seed | val gap | std | per seed |",
              "| ---: | --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | --- |"]
    for g in p["gaps"]:
        se = g.get("test_paired_se")
        lines.append(f"| {g['budget']} | {g['arm']} | {g['seeds']} | {g['test_mean']:+.2f} | {g['test_std']:.2f} | "
                     f"{'' if se is None else f'{se:.2f}'} | "
                     f"{', '.join(f'{x:+.2f}' for x in g['test_gaps'])} | {g['val_mean']:+.2f} | "
                     f"{g['val_std']:.2f} | {', '.join(f'{x:+.2f}' for x in g['val_gaps'])} |")
    lines += ["", "Paired test SE: the mean test gap's standard error over test images, BCD's and SNL's models "
              "compared image by image (another test set of this size could move it that much; the std: another seed)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    arms = [a for a in args.arms.split(",") if a.strip()]
    unknown = sorted(set(arms) - set(ARMS))
    if unknown:
        raise SystemExit(f"unknown arms {', '.join(unknown)}; choose from {', '.join(ARMS)}")
    rows, starts = [], {}
    for seed in seeds:
        root = out / args.scale / f"seed{seed}"
        settings = run_settings(args.scale, root)
        common = {"data.dataset": f"npz:{Path(args.data).resolve()}", "model.arch": "resnet18", "device": args.device,
                  "seed": seed, **SCALES[args.scale]}
        # identity's baseline always (every run's teacher); a start's SNL model when an arm asked for needs it
        needed = {START_OF[arm] for arm in arms}
        for start in STARTS:
            if start == "identity" or start in needed:
                made = run(root / start, {**common, **settings[start]},
                           stop_after="snl" if start in needed else "baseline")
                starts[f"seed{seed}/{start}"] = {"baseline": made.get("baseline"), "snl": made.get("snl")}
        for arm in arms:
            rows += method_rows(run(root / arm, {**common, **settings[arm]}), arm, seed)

    import numpy as np

    test_images = int(np.load(args.data)["y_test"].shape[0])
    payload = {"scale": args.scale, "settings": SCALES[args.scale], "sizes": SIZES[args.scale], "seeds": seeds,
               "machine": report.machine(), "data": Path(args.data).name, "rows": rows, "table": aggregate(rows),
               "test_images": test_images, "test_standard_error_points_max": 100 * math.sqrt(0.25 / test_images),
               "gaps": gaps(rows, per_image_correct()), "starts": starts}
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


if __name__ == "__main__":
    main()
