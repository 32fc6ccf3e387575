"""The run's report: steps.csv, summary.json and PNG plots (accuracy vs ReLU budget, per-site ReLUs per target,
accepted drop per step). Files are written atomically, so a report read mid-run is never half-written."""
from __future__ import annotations

import csv
import io
import json
import os
import platform
from pathlib import Path
from typing import Mapping, Optional, Sequence

import torch

from .files import atomic_write, atomic_write_text
from .search import cpu_pass

STEP_COLUMNS = ["step", "target", "budget_before", "budget_after", "removed", "ref_acc", "ref_loss",
                "ref_se_points", "scoring_images", "tries_scored", "rt", "accepted_index", "accepted_drop",
                "accepted_acc", "accepted_loss", "fallback", "val_acc", "val_loss", "forward_images", "train_images",
                "seconds_scoring", "seconds_finetune", "seconds"]


def machine() -> dict:
    """Where the numbers came from: they mean little without it. With the CPU scoring pass sizes this process has
    measured so far (cpu_pass; write_report brings them up to date, as scoring measures them during the run)."""
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    passes = cpu_pass.measured()
    if passes:
        info["cpu_scoring_passes"] = passes
    return info


def write_steps_csv(path: str | Path, history: Sequence[Mapping]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=STEP_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: row.get(k) for k in STEP_COLUMNS})
    atomic_write_text(path, buffer.getvalue())


def write_json(path: str | Path, payload: Mapping) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2, default=str) + "\n")


# ---- plots (matplotlib's object API with the Agg canvas: no global backend switch, no display needed) --------------
def _figure(width: float = 6.4, height: float = 4.0):
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=110)
    return figure, figure.subplots()


def _save(figure, path: str | Path) -> None:
    figure.tight_layout()
    with atomic_write(path) as tmp:
        figure.savefig(str(tmp), format="png")


def plot_accuracy_vs_budget(path: str | Path, series: Mapping[str, Sequence[tuple[int, float]]],
                            ylabel: str = "test accuracy (%)") -> None:
    """One line per method (e.g. "BCD", "SNL"): (ReLU budget, accuracy) points, budget on a log axis."""
    figure, axes = _figure()
    for (name, points), marker in zip(series.items(), "osD^v"):
        points = sorted((int(b), float(a)) for b, a in points if a is not None)
        if points:
            axes.plot([b for b, _ in points], [a for _, a in points], marker=marker, label=name)
    axes.set_xscale("log")
    axes.set_xlabel("ReLU budget")
    axes.set_ylabel(ylabel)
    axes.grid(True, alpha=0.3)
    axes.legend()
    _save(figure, path)


def plot_per_site(path: str | Path, per_site: Sequence[Mapping], title: str) -> None:
    """Kept ReLUs per site as bars, in forward order (the paper's Fig. 7), with each site's total as a light bar."""
    figure, axes = _figure(8.0, 4.0)
    positions = range(len(per_site))
    axes.bar(positions, [s["total"] for s in per_site], color="0.85", label="total")
    axes.bar(positions, [s["kept"] for s in per_site], color="C0", label="kept")
    axes.set_xticks(list(positions))
    axes.set_xticklabels([s["site"] for s in per_site], rotation=70, fontsize=7)
    axes.set_yscale("symlog", linthresh=10)
    axes.set_ylabel("ReLUs")
    axes.set_title(title)
    axes.legend()
    _save(figure, path)


def plot_accepted_drops(path: str | Path, history: Sequence[Mapping], adt: float, criterion: str) -> None:
    figure, axes = _figure()
    steps = [r["step"] for r in history]
    drops = [r["accepted_drop"] for r in history]
    fallback = [bool(r["fallback"]) for r in history]
    axes.plot(steps, drops, color="0.6", linewidth=0.8)
    axes.scatter([s for s, f in zip(steps, fallback) if not f], [d for d, f in zip(drops, fallback) if not f],
                 color="C0", s=14, label="accepted (< ADT)")
    axes.scatter([s for s, f in zip(steps, fallback) if f], [d for d, f in zip(drops, fallback) if f],
                 color="C3", s=14, label="fallback (smallest drop)")
    axes.axhline(adt, color="C2", linestyle="--", label=f"ADT {adt:g}")
    axes.set_xlabel("BCD step")
    axes.set_ylabel("accepted drop (" + ("accuracy points" if criterion == "accuracy" else "loss") + ")")
    axes.grid(True, alpha=0.3)
    axes.legend()
    _save(figure, path)


def attach_pi(run_dir: str | Path, section: str, budget: Optional[int], rows: Sequence[Mapping]) -> Path:
    """Puts a model's private-inference measurements (fastmask-pi's rows) into the run's summary.json, under its
    entry: summary[section] (e.g. "snl"), or the entry of `budget` in the list summary[section] ("targets",
    "snl_targets")."""
    path = Path(run_dir) / "summary.json"
    summary = json.loads(path.read_text())
    entry = summary.get(section)
    entries = entry if isinstance(entry, list) else [entry] if isinstance(entry, dict) else []
    for item in entries:
        if budget is None or int(item["budget"]) == int(budget):
            item["pi"] = list(rows)
    write_json(path, summary)
    return path


def write_report(out_dir: str | Path, summary: Mapping, history: Sequence[Mapping]) -> list[Path]:
    """steps.csv, summary.json and the plots from a run summary. summary needs: "targets" (list of {budget,
    test_acc, val_acc, per_site}), optional "snl" ({budget, test_acc, ...}) and "config" ({adt, criterion}). Its
    "machine" section, when present, gets the CPU scoring pass sizes measured in this process (cpu_pass)."""
    out_dir = Path(out_dir)
    written = [out_dir / "steps.csv", out_dir / "summary.json"]
    passes = cpu_pass.measured()
    if passes and isinstance(summary.get("machine"), Mapping):  # measured after the summary took its machine()
        summary = {**summary, "machine": {**summary["machine"], "cpu_scoring_passes": passes}}
    write_steps_csv(written[0], history)
    write_json(written[1], summary)
    plots = out_dir / "plots"
    targets = list(summary.get("targets", []))
    series = {"BCD": [(t["budget"], t.get("test_acc")) for t in targets]}
    start = summary.get("start") or {}
    if start.get("test_acc") is not None:  # the model BCD started from anchors its curve
        series["BCD"].append((start["relu_count"], start["test_acc"]))
    snl_points = [(p["budget"], p.get("test_acc")) for p in summary.get("snl_points", [])]
    if snl_points:
        series["SNL"] = snl_points
    if any(a is not None for points in series.values() for _, a in points):
        written.append(plots / "accuracy_vs_budget.png")
        plot_accuracy_vs_budget(written[-1], series)
    for target in targets:
        written.append(plots / f"per_site_{target['budget']}.png")
        plot_per_site(written[-1], target["per_site"], f"ReLUs per site at {target['budget']} (BCD)")
    if history:
        search = summary.get("config", {}).get("bcd", {})
        written.append(plots / "accepted_drop.png")
        plot_accepted_drops(written[-1], history, float(search.get("adt", 0.0)), search.get("criterion", "accuracy"))
    return written
