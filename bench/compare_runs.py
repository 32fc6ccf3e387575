"""Did a change alter what a run produces? Compares two finished run folders of the same settings.

    python bench/compare_runs.py BEFORE_RUN AFTER_RUN

Masks are compared byte for byte; models by their tensors and metadata, timings left out (safetensors writes a
header's metadata keys in an order that changes from process to process, so two writes of one model may differ in
those bytes alone); steps.csv
on every column both have but the timings; summary.json on each target's accuracies, losses, images and per-site
counts. Prints one line per item and exits 1 when anything differs.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

TIMINGS = {"seconds_scoring", "seconds_finetune", "seconds"}
TARGET_KEYS = ("budget", "val_acc", "test_acc", "val_loss", "test_loss", "train_images", "forward_images", "per_site")


def same_model(a: Path, b: Path) -> bool:
    import torch
    from safetensors.torch import load_file

    ta, tb = load_file(str(a)), load_file(str(b))
    return ta.keys() == tb.keys() and all(ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]) for k in ta) \
        and _metadata(a) == _metadata(b)


def _metadata(path: Path) -> dict:
    """A checkpoint's metadata, its JSON values parsed and the seconds a stage took left out."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        metadata = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
    return {k: {key: value for key, value in v.items() if key not in TIMINGS} if isinstance(v, dict) else v
            for k, v in metadata.items()}


def same_steps(a: Path, b: Path) -> tuple[bool, str]:
    rows_a, rows_b = list(csv.DictReader(a.open())), list(csv.DictReader(b.open()))
    columns = [c for c in (rows_a[0] if rows_a else {}) if c in (rows_b[0] if rows_b else {}) and c not in TIMINGS]
    same = len(rows_a) == len(rows_b) and all(ra[c] == rb[c] for ra, rb in zip(rows_a, rows_b) for c in columns)
    return same, f"{len(rows_a)} steps, {len(columns)} columns"


def compare(before: Path, after: Path) -> list[tuple[str, bool]]:
    """(item, same) for every file both runs should share."""
    results = []
    for stage in ("baseline", "snl"):
        if (before / stage / "model.safetensors").is_file():
            results.append((f"{stage}/model.safetensors",
                            same_model(before / stage / "model.safetensors", after / stage / "model.safetensors")))
    for target in sorted(p.name for p in (before / "targets").iterdir()):
        masks = Path("targets", target, "masks.safetensors")
        model = Path("targets", target, "model.safetensors")
        results.append((str(masks), (after / masks).is_file()
                        and (before / masks).read_bytes() == (after / masks).read_bytes()))
        results.append((str(model), (after / model).is_file() and same_model(before / model, after / model)))
    same, what = same_steps(before / "steps.csv", after / "steps.csv")
    results.append((f"steps.csv ({what}, timings left out)", same))
    summaries = [json.loads((run / "summary.json").read_text()).get("targets", []) for run in (before, after)]
    for tb, ta in zip(*summaries):
        results.append((f"summary.json target {tb['budget']}", all(tb.get(k) == ta.get(k) for k in TARGET_KEYS)))
    if len(summaries[0]) != len(summaries[1]):
        results.append(("summary.json targets", False))
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before")
    parser.add_argument("after")
    args = parser.parse_args(argv)
    results = compare(Path(args.before), Path(args.after))
    for item, same in results:
        print(f"{'same     ' if same else 'DIFFERENT'} {item}")
    differing = sum(not same for _, same in results)
    print("identical" if not differing else f"{differing} of {len(results)} items differ")
    return 1 if differing else 0


if __name__ == "__main__":
    sys.exit(main())
