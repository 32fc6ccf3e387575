"""The run's report: steps.csv, summary.json, report.md (every model's ReLUs, non-empty sites, MACs, accuracy, and
per protocol its predicted bytes, rounds and LAN/WAN latency; the mask IoU) and PNG plots (accuracy vs ReLU budget
and vs predicted WAN latency, per-site ReLUs per target and BCD vs SNL, mask IoU, accepted drop per step). Files are
written atomically, so a report read mid-run is never half-written. remake_report(out_dir) makes a finished run's
report again (older runs get the latency columns from their saved models)."""
from __future__ import annotations

import copy
import csv
import io
import json
import math
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
                "seconds_scoring", "seconds_finetune", "seconds", "latency_seconds", "sites"]


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


def _budget_ticks(axes, budgets: Sequence[int]) -> None:
    """x ticks at the budgets run, as plain numbers (1,200 / 2,000), not a log axis's powers of ten."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    ticks = sorted({int(b) for b in budgets})
    axes.xaxis.set_major_locator(FixedLocator(ticks))
    axes.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:,.0f}"))
    axes.xaxis.set_minor_locator(NullLocator())
    if len(ticks) > 6:  # crowded labels stay legible turned
        for label in axes.get_xticklabels():
            label.set_rotation(45)


def _baseline_line(axes, baseline: Optional[Mapping]) -> None:
    """The all-ReLU model's test accuracy as a dashed line: what every point gives up."""
    if baseline and baseline.get("test_acc") is not None:
        relus = baseline.get("relu_count")
        axes.axhline(float(baseline["test_acc"]), color="0.4", linestyle="--", linewidth=1,
                     label="baseline " + (f"({relus:,} ReLUs) " if relus else "") + f"{baseline['test_acc']:.2f}%")


def _points(points: Sequence[tuple]) -> list[tuple]:
    """(x, y, ...) points with an accuracy and an x, sorted by x."""
    return sorted((p for p in points if p[0] is not None and p[1] is not None), key=lambda p: p[0])


def plot_accuracy_vs_budget(path: str | Path, series: Mapping[str, Sequence[tuple[int, float]]],
                            ylabel: str = "test accuracy (%)", baseline: Optional[Mapping] = None) -> None:
    """One line per method (e.g. "BCD", "SNL"): (ReLU budget, accuracy) points, budget on a log axis ticked at the
    budgets run; the baseline's accuracy (summary["baseline"]) as a dashed line."""
    figure, axes = _figure()
    budgets = []
    for (name, points), marker in zip(series.items(), "osD^v"):
        points = _points([(int(b), float(a)) for b, a in points if a is not None])
        if points:
            axes.plot([b for b, _ in points], [a for _, a in points], marker=marker, label=name)
            budgets += [b for b, _ in points]
    _baseline_line(axes, baseline)
    axes.set_xscale("log")
    if budgets:
        _budget_ticks(axes, budgets)
    axes.set_xlabel("ReLU budget (kept ReLUs)")
    axes.set_ylabel(ylabel)
    axes.grid(True, alpha=0.3)
    axes.legend()
    _save(figure, path)


def plot_accuracy_vs_latency(path: str | Path, series: Mapping[str, Sequence[tuple[float, float, int]]],
                             xlabel: str, baseline: Optional[Mapping] = None) -> None:
    """One line per method: (predicted latency in seconds, test accuracy, ReLU budget) points, each labelled with
    its budget, so the plot reads as what a second of waiting buys."""
    figure, axes = _figure()
    for index, ((name, points), marker) in enumerate(zip(series.items(), "osD^v")):
        points = _points(points)
        if not points:
            continue
        line, = axes.plot([p[0] for p in points], [p[1] for p in points], marker=marker, label=name)
        offset = (4, 4) if index % 2 == 0 else (4, -11)  # one method's labels above, the other's below its points
        for seconds, accuracy, budget in points:
            axes.annotate(f"{int(budget):,}", (seconds, accuracy), textcoords="offset points", xytext=offset,
                          fontsize=7, color=line.get_color())
    _baseline_line(axes, baseline)
    axes.set_xlabel(xlabel)
    axes.set_ylabel("test accuracy (%)")
    axes.grid(True, alpha=0.3)
    axes.legend()
    _save(figure, path)


def _save_site_plot(figure, axes, per_site: Sequence[Mapping], title: str, path: str | Path) -> None:
    """The per-site plots' common dress: site names under the bars, a log scale that still shows 0 and 1."""
    axes.set_xticks(list(range(len(per_site))))
    axes.set_xticklabels([s["site"] for s in per_site], rotation=70, fontsize=7)
    axes.set_yscale("symlog", linthresh=10)
    axes.set_ylabel("ReLUs")
    axes.set_title(title)
    axes.legend()
    _save(figure, path)


def plot_per_site(path: str | Path, per_site: Sequence[Mapping], title: str) -> None:
    """Kept ReLUs per site as bars, in forward order (the paper's Fig. 7), with each site's total as a light bar."""
    figure, axes = _figure(8.0, 4.0)
    positions = range(len(per_site))
    axes.bar(positions, [s["total"] for s in per_site], color="0.85", label="total")
    axes.bar(positions, [s["kept"] for s in per_site], color="C0", label="kept")
    _save_site_plot(figure, axes, per_site, title, path)


def plot_per_site_pair(path: str | Path, first: Sequence[Mapping], second: Sequence[Mapping],
                       names: tuple[str, str], title: str) -> None:
    """Kept ReLUs per site of two masks at one budget (BCD's and SNL's) side by side, each site's total light
    behind: where the two methods spend the same budget differently."""
    figure, axes = _figure(8.0, 4.0)
    positions = list(range(len(first)))
    width = 0.4
    axes.bar(positions, [s["total"] for s in first], width=0.9, color="0.88", label="total")
    axes.bar([p - width / 2 for p in positions], [s["kept"] for s in first], width=width, color="C0",
             label=names[0])
    axes.bar([p + width / 2 for p in positions], [s["kept"] for s in second], width=width, color="C1",
             label=names[1])
    _save_site_plot(figure, axes, first, title, path)


def plot_mask_iou(path: str | Path, labels: Sequence[str], matrix: Sequence[Sequence[Optional[float]]]) -> None:
    """IoU of the kept positions between every pair of masks (the paper's Fig. 6), with the numbers written in."""
    size = max(4.0, 0.7 * len(labels) + 2.0)
    figure, axes = _figure(size + 1.0, size)
    values = [[float("nan") if v is None else float(v) for v in row] for row in matrix]
    image = axes.imshow(values, vmin=0.0, vmax=1.0, cmap="viridis")
    for i, row in enumerate(values):
        for j, value in enumerate(row):
            if value == value:  # not NaN
                axes.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7,
                          color="black" if value > 0.6 else "white")
    axes.set_xticks(range(len(labels)))
    axes.set_yticks(range(len(labels)))
    axes.set_xticklabels(labels, rotation=45, ha="right", fontsize=8)
    axes.set_yticklabels(labels, fontsize=8)
    axes.set_title("mask IoU (kept ReLUs)")
    figure.colorbar(image, ax=axes, fraction=0.046)
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


# ---- the models a run made, their cost and masks --------------------------------------------------------------
def run_models(summary: Mapping) -> list[tuple[str, Optional[int], Mapping, str]]:
    """(method, budget, entry, folder in the out dir) of every model in the summary, in the order a reader compares
    them: the baseline, SNL's reference model B_ref ("SNL ref"; or the start, when no SNL made it), BCD's targets,
    SNL's targets."""
    models: list[tuple[str, Optional[int], Mapping, str]] = []
    if summary.get("baseline"):
        models.append(("baseline", None, summary["baseline"], "baseline"))
    if summary.get("snl"):
        models.append(("SNL ref", summary["snl"].get("budget"), summary["snl"], "snl"))
    elif summary.get("start"):
        models.append(("start", summary["start"].get("relu_count"), summary["start"], "start"))
    for method, key in (("BCD", "targets"), ("SNL", "snl_targets")):
        for target in summary.get(key, []):
            models.append((method, int(target["budget"]), target, f"{key}/{target['budget']}"))
    return models


def protocol_names(entries: Sequence[Mapping]) -> list[str]:
    """The protocols the entries' cost fields name, in first-seen order (cost.PROTOCOLS may grow)."""
    names: list[str] = []
    for entry in entries:
        for name in (entry.get("cost") or {}).get("protocols", {}):
            if name not in names:
                names.append(name)
    return names


def latency(entry: Mapping, protocol: str, network: str = "wan") -> Optional[float]:
    """The entry's predicted seconds per image for `protocol` on `network`, or None when it was not costed."""
    return ((entry.get("cost") or {}).get("protocols", {}).get(protocol) or {}).get(f"{network}_seconds")


def read_masks(path: str | Path) -> Optional[dict[str, torch.Tensor]]:
    """A masks.safetensors file (MaskSet.save) as {site: bool mask}, or None when it is not there."""
    from safetensors.torch import load_file

    path = Path(path)
    return {name: t.bool() for name, t in load_file(str(path)).items()} if path.is_file() else None


def mask_iou(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> Optional[float]:
    """|A and B| / |A or B| over the kept positions of two masks of one architecture (1 for two empty masks); None
    when the sites or shapes differ."""
    if set(a) != set(b) or any(a[k].shape != b[k].shape for k in a):
        return None
    both = sum(int((a[k] & b[k]).sum()) for k in a)
    either = sum(int((a[k] | b[k]).sum()) for k in a)
    return 1.0 if either == 0 else both / either


def mask_iou_table(out_dir: str | Path, summary: Mapping) -> Optional[dict]:
    """IoU between every pair of target masks saved in the out dir (BCD's and SNL's), and BCD's against SNL's at
    each budget both reached; None with fewer than two masks."""
    masks: dict[tuple[str, int], dict] = {}
    for method, budget, _, folder in run_models(summary):
        if method in ("BCD", "SNL"):  # the targets
            found = read_masks(Path(out_dir) / folder / "masks.safetensors")
            if found is not None:
                masks[(method, budget)] = found
    if len(masks) < 2:
        return None
    keys = list(masks)

    def iou(x, y) -> Optional[float]:
        value = mask_iou(masks[x], masks[y])
        return None if value is None else round(value, 4)

    return {"masks": [f"{method} {budget}" for method, budget in keys],
            "matrix": [[iou(x, y) for y in keys] for x in keys],
            "bcd_vs_snl": {str(budget): iou(("BCD", budget), ("SNL", budget))
                           for method, budget in keys if method == "BCD" and ("SNL", budget) in masks}}


# ---- report.md -------------------------------------------------------------------------------------------------
def _count(value) -> str:
    return "–" if value is None else f"{int(round(value)):,}"


def _seconds(value: Optional[float]) -> str:
    """Three significant digits, never an exponent: 0.0123, 1.23, 12.3, 1,234."""
    if value is None:
        return "–"
    if value == 0 or abs(value) >= 100:
        return f"{value:,.0f}"
    decimals = max(0, 2 - math.floor(math.log10(abs(value))))
    return f"{value:.{decimals}f}"


def _percent(value: Optional[float]) -> str:
    return "–" if value is None else f"{value:.2f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], labels: int = 2) -> list[str]:
    """A markdown table whose first `labels` columns are text and the rest numbers (right-aligned)."""
    right = ["---:" if i >= labels else "---" for i in range(len(header))]
    return ["| " + " | ".join(header) + " |", "| " + " | ".join(right) + " |"] + \
        ["| " + " | ".join(row) + " |" for row in rows]


def _relus(entry: Mapping, budget: Optional[int]) -> Optional[int]:
    return (entry.get("cost") or {}).get("relus", entry.get("relu_count", budget))


def _sites(entry: Mapping) -> Optional[int]:
    if entry.get("cost"):
        return entry["cost"]["sites"]
    per_site = entry.get("per_site")
    return None if per_site is None else sum(1 for s in per_site if s["kept"] > 0)


def per_site_table(models: Sequence[tuple[str, Optional[int], Mapping, str]]) -> list[str]:
    """Kept ReLUs per site (rows, forward order) of every model that lists them (columns): where each method spent
    its budget, as numbers beside the per-site plots. Empty when no two models share the same sites."""
    columns = [(method if budget is None else f"{method} {budget:,}", {s["site"]: s for s in entry["per_site"]})
               for method, budget, entry, _ in models if entry.get("per_site")]
    if not columns:
        return []
    sites = [s["site"] for s in next(entry["per_site"] for _, _, entry, _ in models if entry.get("per_site"))]
    if any(list(kept) != sites for _, kept in columns):
        return []
    rows = [[site, _count(columns[0][1][site]["total"]), *(_count(kept[site]["kept"]) for _, kept in columns)]
            for site in sites]
    return ["", "## Kept ReLUs per site", ""] + _table(["site", "total", *(name for name, _ in columns)], rows,
                                                       labels=1)


def markdown_report(summary: Mapping) -> str:
    """The run as tables a person reads: every model's ReLUs, non-empty sites, plaintext MACs and accuracy; per
    protocol its predicted bytes, rounds and latency on each network; the mask IoU."""
    from . import cost

    models = run_models(summary)
    lines = ["# fastmask run report", "",
             "Costs are predictions for one image (fastmask.cost): latency = local compute + rounds x RTT + bytes / "
             "bandwidth, on " + "; ".join(str(n) for n in cost.NETWORKS.values()) + ".", "", "## Models", ""]
    lines += _table(["method", "target", "ReLUs", "non-empty sites", "plaintext MACs", "val acc (%)", "test acc (%)"],
                    [[method, _count(budget), _count(_relus(entry, budget)), _count(_sites(entry)),
                      _count((entry.get("cost") or {}).get("macs")), _percent(entry.get("val_acc")),
                      _percent(entry.get("test_acc"))] for method, budget, entry, _ in models])
    entries = [entry for _, _, entry, _ in models]
    for protocol in protocol_names(entries):
        networks = [key[:-len("_seconds")] for key in next(e["cost"]["protocols"][protocol] for e in entries
                                                            if protocol in (e.get("cost") or {}).get("protocols", {}))
                    if key.endswith("_seconds")]
        lines += ["", f"## {protocol}", ""]
        rows = []
        for method, budget, entry, _ in models:
            row = (entry.get("cost") or {}).get("protocols", {}).get(protocol)
            if row is not None:
                rows.append([method, _count(budget), _count(_relus(entry, budget)), _count(row["bytes"]),
                             _count(row["rounds"]), *(_seconds(row.get(f"{n}_seconds")) for n in networks),
                             _percent(entry.get("test_acc"))])
        lines += _table(["method", "target", "ReLUs", "bytes", "rounds", *(f"{n.upper()} (s)" for n in networks),
                         "test acc (%)"], rows)
    lines += per_site_table(models)
    iou = summary.get("mask_iou")
    if iou:
        lines += ["", "## Mask IoU (kept ReLUs)", ""]
        lines += _table(["", *iou["masks"]], [[label, *("–" if v is None else f"{v:.3f}" for v in row)]
                                              for label, row in zip(iou["masks"], iou["matrix"])], labels=1)
        if iou.get("bcd_vs_snl"):
            lines += ["", "BCD against SNL at the same budget: " + ", ".join(
                f"{int(b):,}: {'–' if v is None else f'{v:.3f}'}" for b, v in iou["bcd_vs_snl"].items()) + "."]
    return "\n".join(lines) + "\n"


def accuracy_series(summary: Mapping) -> dict[str, list[tuple]]:
    """Per method, (ReLU budget, test accuracy, entry) points: BCD's targets anchored at the model it started from,
    SNL's reference model and targets."""
    series = {"BCD": [(t["budget"], t.get("test_acc"), t) for t in summary.get("targets", [])]}
    start = summary.get("start") or {}
    if series["BCD"] and start.get("test_acc") is not None:  # the model BCD started from anchors its curve
        series["BCD"].append((start["relu_count"], start["test_acc"], start))
    snl_points = [(p["budget"], p.get("test_acc"), p) for p in summary.get("snl_points", [])]
    if snl_points:
        series["SNL"] = snl_points
    return series


def write_plots(plots: Path, summary: Mapping, history: Sequence[Mapping]) -> list[Path]:
    """Every plot the summary has the numbers for; returns the files written."""
    from . import cost

    written: list[Path] = []
    baseline = summary.get("baseline")
    series = accuracy_series(summary)
    if any(a is not None for points in series.values() for _, a, _ in points):
        written.append(plots / "accuracy_vs_budget.png")
        plot_accuracy_vs_budget(written[-1], {name: [(b, a) for b, a, _ in points] for name, points in series.items()},
                                baseline=baseline)
    protocol, network = cost.DEFAULT_PROTOCOL, cost.NETWORKS["wan"]
    timed = {name: [(latency(e, protocol), a, b) for b, a, e in points] for name, points in series.items()}
    if any(s is not None and a is not None for points in timed.values() for s, a, _ in points):
        written.append(plots / "accuracy_vs_latency.png")
        plot_accuracy_vs_latency(written[-1], timed, f"predicted latency per image (s), {protocol} on {network}",
                                 baseline=baseline)
    targets = list(summary.get("targets", []))
    for target in targets:
        written.append(plots / f"per_site_{target['budget']}.png")
        plot_per_site(written[-1], target["per_site"], f"ReLUs per site at {target['budget']:,} (BCD)")
    snl_targets = {t["budget"]: t for t in summary.get("snl_targets", []) if t.get("per_site")}
    for target in targets:
        other = snl_targets.get(target["budget"])
        if other is not None and [s["site"] for s in other["per_site"]] == [s["site"] for s in target["per_site"]]:
            written.append(plots / f"per_site_bcd_vs_snl_{target['budget']}.png")
            plot_per_site_pair(written[-1], target["per_site"], other["per_site"], ("BCD", "SNL"),
                               f"ReLUs per site at {target['budget']:,}: BCD and SNL")
    iou = summary.get("mask_iou")
    if iou:
        written.append(plots / "mask_iou.png")
        plot_mask_iou(written[-1], iou["masks"], iou["matrix"])
    if history:
        search = summary.get("config", {}).get("bcd", {})
        written.append(plots / "accepted_drop.png")
        plot_accepted_drops(written[-1], history, float(search.get("adt", 0.0)), search.get("criterion", "accuracy"))
    return written


def fill_costs(out_dir: str | Path, summary: Mapping) -> dict:
    """The summary with a "cost" on every model entry that lacks one and whose model is saved in the out dir (runs
    made before entries carried their cost); entries that have one, or no model file, are left as they are."""
    from . import checkpoint, cost

    summary = copy.deepcopy(dict(summary))
    for _, _, entry, folder in run_models(summary):
        path = Path(out_dir) / folder / "model.safetensors"
        if "cost" not in entry and path.is_file():
            entry["cost"] = cost.summary(cost.workload(checkpoint.load_model(path)))
    return summary


def read_steps_csv(path: str | Path) -> list[dict]:
    """steps.csv back as rows of numbers, booleans and None (empty cells), as the run wrote them."""
    def value(text: str):
        if text == "":
            return None
        if text in ("True", "False"):
            return text == "True"
        for kind in (int, float):
            try:
                return kind(text)
            except ValueError:
                pass
        return text

    with open(path, newline="") as f:
        return [{k: value(v) for k, v in row.items()} for row in csv.DictReader(f)]


def remake_report(out_dir: str | Path) -> list[Path]:
    """The report of a finished run made again from its summary.json and steps.csv, with the costs of models saved
    before entries carried them: older runs get report.md, the latency columns and the new plots."""
    out_dir = Path(out_dir)
    summary = json.loads((out_dir / "summary.json").read_text())
    steps = out_dir / "steps.csv"
    return write_report(out_dir, fill_costs(out_dir, summary), read_steps_csv(steps) if steps.is_file() else [])


def write_report(out_dir: str | Path, summary: Mapping, history: Sequence[Mapping]) -> list[Path]:
    """steps.csv, summary.json, report.md and the plots from a run summary. summary needs: "targets" (list of
    {budget, test_acc, val_acc, per_site, cost}), optional "baseline", "snl", "start", "snl_targets", "snl_points"
    and "config" ({adt, criterion}). The IoU of the target masks saved in the out dir goes into summary.json as
    "mask_iou". Its "machine" section, when present, gets the CPU scoring pass sizes measured in this process
    (cpu_pass)."""
    out_dir = Path(out_dir)
    written = [out_dir / "steps.csv", out_dir / "summary.json", out_dir / "report.md"]
    passes = cpu_pass.measured()
    if passes and isinstance(summary.get("machine"), Mapping):  # measured after the summary took its machine()
        summary = {**summary, "machine": {**summary["machine"], "cpu_scoring_passes": passes}}
    iou = mask_iou_table(out_dir, summary)
    if iou is not None:
        summary = {**summary, "mask_iou": iou}
    write_steps_csv(written[0], history)
    write_json(written[1], summary)
    atomic_write_text(written[2], markdown_report(summary))
    return written + write_plots(out_dir / "plots", summary, history)
