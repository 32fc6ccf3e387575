"""Fidelity: BCD against SNL at low ReLU budgets, from the same model, with the same finetune budget.

    python bench/fidelity.py --scale small --device cpu        # ~20 minutes on 2 CPU cores
    python bench/fidelity.py --scale full --device cuda        # closer to the paper's settings (GPU)

On ../shared/data/cifar10_subset.npz (--data) with resnet18 at width 16: train a baseline, SNL it to B_ref, then from
that SAME model
  - BCD down through every target in one run (each target saved when reached), and
  - SNL straight from B_ref to each target (alpha phase, binarize), then a finetune of exactly as many SGD steps
    (same batch size, so the same number of images) as BCD spent finetuning on its way down to that target.
Both use the baseline as KD teacher. Test accuracy is measured once per method and target; val is used for nothing
but reporting. Writes fidelity.md and fidelity.json (budgets, both accuracies, wall times, machine) into --out.
The baseline and the SNL@B_ref model are cached in --out and reused when their settings match.
"""
from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fastmask import checkpoint, data, models, report, train  # noqa: E402
from fastmask.nn import relu_count  # noqa: E402
from fastmask.search.bcd import BCDConfig, run_bcd  # noqa: E402
from fastmask.search.snl import SNLConfig, run_snl  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data" / "cifar10_subset.npz"

# Budget knobs. finetune_steps is per BCD step (batch 128); SNL to each target gets the same total.
# snl_epochs bounds SNL's alpha phase to B_ref; snl_target_epochs bounds it from B_ref to each target (SNL then
# binarizes to exactly the target, reached or not; the table says which).
SCALES = {
    # a minute or two: checks that the script runs end to end, numbers mean nothing
    "smoke": dict(width=16, baseline_epochs=1, ref_budget=20000, targets=[18000, 16000], snl_epochs=2,
                  snl_target_epochs=2, snl_lambda0=3e-3, snl_finetune_epochs=0, drc=1000, rt=2, adt=0.3, score_subset=256,
                  finetune_steps=4, train_limit=1024),
    # ~20 minutes on 2 CPU cores (calibration-note scale, with more finetune per step)
    "small": dict(width=16, baseline_epochs=15, ref_budget=6000, targets=[3000, 1500], snl_epochs=20,
                  snl_target_epochs=8, snl_lambda0=1.1e-3, snl_finetune_epochs=2, drc=300, rt=8, adt=0.3, score_subset=2048,
                  finetune_steps=18, train_limit=0),
    # paper-like search settings (DRC 100, whole-train scoring, a full epoch of finetune per step): for a GPU
    "full": dict(width=16, baseline_epochs=60, ref_budget=6000, targets=[3000, 1500], snl_epochs=60,
                 snl_target_epochs=60, snl_lambda0=1.1e-3, snl_finetune_epochs=10, drc=100, rt=50, adt=0.3, score_subset=0,
                 finetune_steps=71, train_limit=0),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(DEFAULT_DATA), help="cifar10_subset.npz (or any .npz in that layout)")
    p.add_argument("--scale", choices=sorted(SCALES), default="small")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "fidelity"))
    p.add_argument("--seed", type=int, default=0)
    for key, value in SCALES["small"].items():  # every knob of the scale can be overridden
        kind = (lambda s: [int(t) for t in s.split(",")]) if key == "targets" else type(value)
        p.add_argument("--" + key.replace("_", "-"), type=kind, default=None)
    return p.parse_args(argv)


def settings_of(args) -> dict:
    chosen = dict(SCALES[args.scale])
    chosen.update({k: v for k, v in vars(args).items() if k in chosen and v is not None})
    return chosen


def measure(model, dataset, device) -> dict:
    val = train.evaluate(model, dataset.val_x, dataset.val_y, dataset, device)
    test = train.evaluate(model, dataset.test_x, dataset.test_y, dataset, device)
    return {"relu_count": relu_count(model), "val_acc": val[0], "test_acc": test[0]}


def cached(path: Path, key: dict, build, device):
    """The model at `path` when it was built with the same key, else build() and save it."""
    if path.is_file():
        _, extra = checkpoint.read_spec(path)
        if extra.get("key") == key:
            print(f"reusing {path}", flush=True)
            return checkpoint.load_model(path, device=device), extra["info"]
    model, info = build()
    checkpoint.save_model(model, path, extra={"key": key, "info": info})
    return model, info


def finetune_config(arch: str, steps: int, per_epoch: int, seed: int) -> train.TrainConfig:
    config = train.finetune_config(arch, max(1, math.ceil(steps / per_epoch)))
    config.seed = seed
    return config


def main(argv=None) -> dict:
    args = parse_args(argv)
    s = settings_of(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = args.device
    dataset = data.load_dataset(args.data, seed=args.seed)
    if s["train_limit"]:  # smoke only: a slice of the train split
        dataset.train_x, dataset.train_y = dataset.train_x[:s["train_limit"]], dataset.train_y[:s["train_limit"]]
    print(f"{dataset}; device {device}; scale {args.scale}: {s}", flush=True)
    per_epoch = data.steps_per_epoch(len(dataset.train_y), train.TrainConfig(1, "sgd", 1.0).batch_size)
    base_key = {"data": str(args.data), "seed": args.seed, **{k: s[k] for k in ("width", "baseline_epochs",
                                                                                "train_limit")}}

    def build_baseline():
        torch.manual_seed(args.seed)
        model = models.create("resnet18", dataset.num_classes, dataset.image_size, width=s["width"],
                              in_channels=dataset.in_channels)
        t0 = time.perf_counter()
        config = train.baseline_config(s["baseline_epochs"])
        config.seed = args.seed
        train.train(model, dataset, config, device)
        return model, {**measure(model, dataset, device), "seconds": time.perf_counter() - t0}

    baseline, baseline_info = cached(out / "baseline.safetensors", base_key, build_baseline, device)
    teacher = copy.deepcopy(baseline).eval()
    print(f"baseline: {baseline_info}", flush=True)

    def snl_to(start, budget, finetune_epochs, max_epochs):
        model = copy.deepcopy(start)
        t0 = time.perf_counter()
        history = run_snl(model, dataset, SNLConfig(budget=budget, lambda0=s["snl_lambda0"],
                                                    max_epochs=max_epochs, finetune_epochs=finetune_epochs,
                                                    seed=args.seed), device, teacher=teacher)
        return model, {"snl_epochs": history["snl_epochs"], "reached_budget": history["reached_budget"],
                       "seconds": time.perf_counter() - t0}

    ref_key = {**base_key, **{k: s[k] for k in ("ref_budget", "snl_epochs", "snl_lambda0", "snl_finetune_epochs")}}

    def build_reference():
        model, info = snl_to(baseline, s["ref_budget"], s["snl_finetune_epochs"], s["snl_epochs"])
        return model, {**info, **measure(model, dataset, device)}

    reference, reference_info = cached(out / f"snl_ref_{s['ref_budget']}.safetensors", ref_key, build_reference,
                                       device)
    print(f"SNL@B_ref: {reference_info}", flush=True)

    # ---- BCD from the SNL@B_ref model through every target ----
    bcd_dir = out / f"bcd_{args.scale}"
    if bcd_dir.exists():
        import shutil

        shutil.rmtree(bcd_dir)  # a fresh BCD run each time: its wall time is part of the result
    bcd_model = copy.deepcopy(reference)
    bcd_config = BCDConfig(targets=s["targets"], drc=s["drc"], rt=s["rt"], adt=s["adt"], seed=args.seed)
    result = run_bcd(bcd_model, dataset, bcd_config, device, bcd_dir,
                     finetune_config=finetune_config("resnet18", s["finetune_steps"], per_epoch, args.seed),
                     finetune_max_steps=s["finetune_steps"], score_subset=s["score_subset"], teacher=teacher)

    rows = []
    for target in result.targets:
        steps_to_target = [r for r in result.history if r["step"] <= target["step"]]
        finetune_steps = s["finetune_steps"] * len(steps_to_target)
        bcd_seconds = sum(r["seconds"] for r in steps_to_target)
        # ---- SNL from the same SNL@B_ref model straight to this target, finetuned with BCD's total ----
        snl_model, snl_info = snl_to(reference, target["budget"], 0, s["snl_target_epochs"])
        t0 = time.perf_counter()
        train.train(snl_model, dataset, finetune_config("resnet18", finetune_steps, per_epoch, args.seed), device,
                    teacher=teacher, max_steps=finetune_steps)
        snl_seconds = snl_info["seconds"] + time.perf_counter() - t0
        snl_scores = measure(snl_model, dataset, device)
        images = finetune_steps * 128
        rows.append({"budget": target["budget"], "bcd_test_acc": target["test_acc"], "bcd_val_acc": target["val_acc"],
                     "snl_test_acc": snl_scores["test_acc"], "snl_val_acc": snl_scores["val_acc"],
                     "bcd_steps": len(steps_to_target),
                     "bcd_fallbacks": sum(bool(r["fallback"]) for r in steps_to_target),
                     "finetune_steps_each": finetune_steps, "finetune_images_each": images,
                     "finetune_epochs_each": images / len(dataset.train_y),
                     "snl_alpha_epochs": snl_info["snl_epochs"], "snl_reached_budget": snl_info["reached_budget"],
                     "bcd_seconds": bcd_seconds,
                     "bcd_seconds_scoring": sum(r["seconds_scoring"] for r in steps_to_target),
                     "snl_seconds": snl_seconds})
        print(f"target {target['budget']}: BCD {target['test_acc']:.2f}% vs SNL {snl_scores['test_acc']:.2f}% test",
              flush=True)

    test_se = 100 * math.sqrt(0.25 / max(len(dataset.test_y), 1))  # worst-case binomial SE of a test accuracy
    payload = {"scale": args.scale, "settings": s, "device": device, "machine": report.machine(),
               "train_images": len(dataset.train_y), "test_images": len(dataset.test_y),
               "test_standard_error_points_max": test_se, "baseline": baseline_info, "snl_ref": reference_info,
               "rows": rows}
    report.write_json(out / "fidelity.json", payload)
    report.atomic_write_text(out / "fidelity.md", markdown(payload))
    report.plot_accuracy_vs_budget(out / "fidelity.png", {
        "BCD": [(r["budget"], r["bcd_test_acc"]) for r in rows] + [(s["ref_budget"], reference_info["test_acc"])],
        "SNL": [(r["budget"], r["snl_test_acc"]) for r in rows] + [(s["ref_budget"], reference_info["test_acc"])]})
    print(markdown(payload))
    return payload


def markdown(p: dict) -> str:
    s = p["settings"]
    machine = p["machine"].get("gpu") or f"{p['machine']['cpu_threads']} CPU threads"
    lines = [
        f"## Fidelity: BCD vs SNL (resnet18 width {s['width']}, {p['train_images']} train / {p['test_images']} "
        f"test images, scale {p['scale']}, {p['device']}: {machine})",
        "",
        f"Baseline {p['baseline']['test_acc']:.2f}% test ({p['baseline']['relu_count']} ReLUs). "
        f"SNL to B_ref = {s['ref_budget']}: {p['snl_ref']['test_acc']:.2f}% test. Both methods start from that "
        f"model and distill from the baseline. BCD: DRC {s['drc']}, RT {s['rt']}, ADT {s['adt']} points on "
        f"{s['score_subset'] or 'all'} train images, {s['finetune_steps']} SGD steps (batch 128) of finetune per "
        "step. SNL: alpha phase from B_ref straight to the target, binarize, then the same number of finetune "
        f"steps as BCD spent reaching that target. Test SE up to {p['test_standard_error_points_max']:.2f} points.",
        "",
        "| ReLUs | BCD test % | SNL test % | BCD - SNL | finetune images (each) | BCD steps (fallbacks) | "
        "BCD wall s (scoring) | SNL wall s (alpha epochs) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in p["rows"]:
        lines.append(f"| {r['budget']} | {r['bcd_test_acc']:.2f} | {r['snl_test_acc']:.2f} | "
                     f"{r['bcd_test_acc'] - r['snl_test_acc']:+.2f} | {r['finetune_images_each']} "
                     f"({r['finetune_epochs_each']:.2f} epochs) | {r['bcd_steps']} ({r['bcd_fallbacks']}) | "
                     f"{r['bcd_seconds']:.0f} ({r['bcd_seconds_scoring']:.0f}) | {r['snl_seconds']:.0f} "
                     f"({r['snl_alpha_epochs']}) |")
    lines.append("")
    lines.append("BCD wall time is cumulative from B_ref (it passes the targets in one run); SNL's is per target.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
