"""Mask transfer: is BCD's gap to SNL in the masks it finds, or in how the model is trained on the way?

    python bench/mask_transfer.py RUN_DIR [--budgets 3000] [--epochs 10] [--snl-run OTHER_RUN]

RUN_DIR is a finished `--method both` run (a fidelity arm's folder): BCD's masks are in targets/<budget>/, SNL's in
snl_targets/<budget>/. For each budget, both masks are put on the SAME weights, the model the run started from
(SNL@B_ref), and each is finetuned with the same recipe, teacher, seed and images (the run's finetune settings,
`finetune.target_epochs` epochs unless --epochs says otherwise). What is left between the two rows is the masks'
doing; what the run's own rows show beyond it is the training's. Test accuracy is reported, never used to choose.
--snl-run takes SNL's masks from another run that started from the same model (a search whose SNL side is another
run's).

Beside them, per site: the ReLUs each mask keeps, and where the informed estimate would keep the same number, had it
removed the cheapest ReLUs of the starting model in one go (on the run's scoring subset). Writes mask_transfer.md
and .json into RUN_DIR (or --out).
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Optional

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fastmask import checkpoint, data, report, train  # noqa: E402
from fastmask.config import read_yaml, resolve  # noqa: E402
from fastmask.errors import FastmaskError  # noqa: E402
from fastmask.masks import MaskSet  # noqa: E402
from fastmask.pipeline import resolve_device, run_dataset  # noqa: E402
from fastmask.search.proposal import removal_costs  # noqa: E402

MASK_SOURCES = {"BCD": "targets", "SNL": "snl_targets"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="a finished --method both run folder (it has config.yaml, targets/, snl_targets/)")
    p.add_argument("--budgets", default=None, help="comma-separated budgets (default: every one both methods reached)")
    p.add_argument("--epochs", type=int, default=None, help="finetune epochs (default: the run's target epochs)")
    p.add_argument("--device", default=None)
    p.add_argument("--out", default=None, help="folder for mask_transfer.md/.json (default: the run folder)")
    p.add_argument("--snl-run", default=None, help="the run whose snl_targets/ hold SNL's masks (default: RUN_DIR); "
                                                   "it must have started from the same model")
    return p.parse_args(argv)


def mask_folders(run: Path, snl_run: Optional[Path] = None) -> dict[str, Path]:
    """{method: the folder holding its masks per budget}."""
    return {"BCD": run / MASK_SOURCES["BCD"], "SNL": (snl_run or run) / MASK_SOURCES["SNL"]}


def reached(folders: dict[str, Path]) -> list[int]:
    """Budgets for which both methods saved a mask, largest first."""
    found = [{int(d.name) for d in folder.glob("*") if (d / "masks.safetensors").is_file()}
             for folder in folders.values()]
    return sorted(set.intersection(*found), reverse=True)


def starting_models(run: Path, config) -> tuple[Path, Optional[Path]]:
    """(the model BCD and SNL started from, the teacher): the run's own SNL@B_ref model when it made one, else the
    checkpoint it was given; its teacher, else its own baseline when it trained one (as the run distilled)."""
    own = run / "snl" / "model.safetensors"
    start = own if own.is_file() else config.model.checkpoint and Path(config.model.checkpoint)
    if start is None or not start.is_file():
        raise FastmaskError(f"{run} has no starting model: neither snl/model.safetensors nor its checkpoint")
    if config.model.teacher:
        return start, Path(config.model.teacher)
    baseline = run / "baseline" / "model.safetensors"
    if baseline.is_file():
        return start, baseline
    # a run that made its SNL@B_ref model from a given checkpoint distilled from that (full-ReLU) checkpoint
    given = config.model.checkpoint
    if own.is_file() and given:
        masks = MaskSet(checkpoint.load_model(given))
        if masks.count() == masks.total():
            return start, Path(given)
    return start, None


def estimate_layouts(start: Path, dataset, config, budgets: list[int], device) -> dict:
    """{"estimate": {budget: [ReLUs kept per site]}}: the starting model's `budget` ReLUs of largest estimated
    cost."""
    model = checkpoint.load_model(start, device=device)
    masks = MaskSet(model)
    images, labels = data.scoring_subset(dataset, config.bcd.score_subset, device, seed=config.seed)
    costs = removal_costs(model, images, labels, batch_size=config.bcd.score_batch_size)
    present = torch.isfinite(costs).nonzero().squeeze(1)
    ranked = present[torch.argsort(costs[present], descending=True, stable=True)]
    return {"estimate": {budget: torch.bincount(masks.site_of(ranked[:budget]), minlength=len(masks.sites)).tolist()
                         for budget in budgets}}


def main(argv=None) -> dict:
    args = parse_args(argv)
    run = Path(args.run)
    config = resolve({}, read_yaml(run / "config.yaml"))
    start, teacher_path = starting_models(run, config)
    snl_run = Path(args.snl_run) if args.snl_run else None
    if snl_run is not None:
        snl_start, _ = starting_models(snl_run, resolve({}, read_yaml(snl_run / "config.yaml")))
        if snl_start.read_bytes() != start.read_bytes():
            raise FastmaskError(f"{snl_run} started from {snl_start}, {run} from {start}: its masks would be put on "
                                "weights they were not made on")
    folders = mask_folders(run, snl_run)
    budgets = [int(b) for b in args.budgets.split(",")] if args.budgets else reached(folders)
    if not budgets:
        raise FastmaskError(f"{run} has no budget with both a BCD and an SNL mask")
    device = resolve_device(args.device)
    dataset = run_dataset(config)
    teacher = None if teacher_path is None else checkpoint.load_model(teacher_path, device=device)
    epochs = config.finetune.target_epochs if args.epochs is None else args.epochs
    if epochs <= 0:
        raise FastmaskError("the run has no target finetune; give --epochs")
    layouts = estimate_layouts(start, dataset, config, budgets, device)
    recipe = train.finetune_recipe(config.finetune, config.model.arch, dataset.name, epochs)
    recipe.seed = config.seed  # the same shuffles, augmentations and teacher for both masks
    rows = []
    for budget in budgets:
        for method, folder in folders.items():
            model = checkpoint.load_model(start, device=device)
            masks = MaskSet(model)
            masks.load(folder / str(budget) / "masks.safetensors")
            if masks.count() != budget:
                raise FastmaskError(f"{method}'s mask at {budget} has {masks.count()} ReLUs")
            history = train.train(model, dataset, recipe, device, teacher=teacher, progress=False)
            val = train.evaluate(model, dataset.val_x, dataset.val_y, dataset, device)
            test = train.evaluate(model, dataset.test_x, dataset.test_y, dataset, device)
            rows.append({"budget": budget, "mask": method, "epochs": epochs, "train_images": history[-1]["images"],
                         "val_acc": val[0], "test_acc": test[0], "per_site": masks.per_site()})
            print(f"{budget} ReLUs, {method}'s mask: val {val[0]:.2f}%, test {test[0]:.2f}%", flush=True)
    out = Path(args.out) if args.out else run
    payload = {"run": str(run), "snl_run": str(snl_run or run), "start": str(start), "epochs": epochs,
               "optimizer": recipe.optimizer, "lr": recipe.lr, "rows": rows, "estimate_layouts": layouts,
               "machine": report.machine(),
               "test_standard_error_points_max": 100 * math.sqrt(0.25 / len(dataset.test_y))}
    report.write_json(out / "mask_transfer.json", payload)
    text = markdown(payload)
    report.atomic_write_text(out / "mask_transfer.md", text)
    print(text)
    return payload


def markdown(p: dict) -> str:
    source = "" if p.get("snl_run", p["run"]) == p["run"] else f"; SNL's masks from {p['snl_run']}"
    lines = [f"## Mask transfer ({p['run']}{source})", "",
             f"Each mask on the run's starting model, then {p['epochs']} finetune epochs ({p['optimizer']}, lr "
             f"{p['lr']:g}, the run's teacher and seed). Test standard error up to "
             f"{p['test_standard_error_points_max']:.2f} points.", "",
             "| ReLUs | mask | val % | test % | train images |", "| ---: | --- | ---: | ---: | ---: |"]
    for r in p["rows"]:
        lines.append(f"| {r['budget']} | {r['mask']} | {r['val_acc']:.2f} | {r['test_acc']:.2f} | "
                     f"{r['train_images']:,} |")
    for budget in sorted({r["budget"] for r in p["rows"]}, reverse=True):
        sites = {r["mask"]: r["per_site"] for r in p["rows"] if r["budget"] == budget}
        estimates = {e: p["estimate_layouts"][e][budget] for e in p["estimate_layouts"]}
        lines += ["", f"ReLUs kept per site at {budget}: each mask, and the {budget} costliest by the estimate "
                  "(on the starting model)", "",
                  "| site | ReLUs in the site | " + " | ".join(f"{m}'s mask" for m in sites) + " | " +
                  " | ".join(f"the {e}" for e in estimates) + " |",
                  "| --- | ---: |" + " ---: |" * (len(sites) + len(estimates))]
        for i, site in enumerate(next(iter(sites.values()))):
            lines.append(f"| {site['site']} | {site['total']:,} | " +
                         " | ".join(str(s[i]["kept"]) for s in sites.values()) + " | " +
                         " | ".join(str(kept[i]) for kept in estimates.values()) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
