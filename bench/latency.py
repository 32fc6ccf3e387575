"""Latency as the cost: BCD with --cost latency against SNL, at the same ReLU budget and at the same predicted WAN
latency (the results: bench/LATENCY.md).

    python bench/latency.py --data cifar10_subset.npz --seeds 0,1,2    # CPU: about an hour a seed
    python bench/latency.py --data cifar10_subset.npz --scale smoke    # minutes: checks the script

Per seed, every run a fastmask.pipeline run from one start (a baseline, every run's teacher, and SNL to B_ref with a
short finetune), the search settings those of bench/fidelity.py's default arm at this scale:
- "relus": --method both, the default search (--cost relus) to each ReLU target, SNL from the same start to each
  target with the same compute (images trained on + pushed forward) as BCD;
- "latency": --method bcd --cost latency to the same ReLU targets;
- "latency-equal": --method bcd --cost latency with --latency-targets at SNL's predicted latency at each target (the
  same seed's "relus" run), so BCD and SNL are compared at the same predicted latency;
- "latency-equal-compute": the same, its target finetune lengthened until it has spent SNL's image passes (the search
  stops early at a latency target, so it spends fewer).
Every target model's bytes, rounds and latency are predicted by fastmask.cost (--protocol on --network, and the
other protocols beside it). Nothing is chosen on test accuracy. Writes latency_<scale>.md/.json into --out.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from fidelity import run  # noqa: E402

from fastmask import cost, report  # noqa: E402
from fastmask.checkpoint import load_model  # noqa: E402
from fastmask.search.compute import image_passes  # noqa: E402

# resnet18 width 4 (30,720 ReLUs), B_ref and the target at the fractions of bench/fidelity.py's small scale (4.9%
# of the ReLUs, and 1.2%: the budget the goal is set at), with shorter training, so that three seeds run on a CPU.
SCALES = {
    "smoke": {"model.width": 4, "baseline.epochs": 1, "snl.ref_budget": 1500, "bcd.targets": [1200, 900],
              "snl.epochs": 2, "snl.target_epochs": 1, "snl.lambda0": 3e-3, "snl.finetune_epochs": 0,
              "bcd.drc": 150, "bcd.score_subset": 128, "finetune.max_steps": 4, "finetune.target_epochs": 1},
    "small": {"model.width": 4, "baseline.epochs": 8, "snl.ref_budget": 1500, "bcd.targets": [375],
              "snl.epochs": 10, "snl.target_epochs": 5, "snl.lambda0": 3e-3, "snl.finetune_epochs": 1,
              "bcd.drc": 75, "bcd.score_subset": 512, "finetune.max_steps": 18, "finetune.target_epochs": 2},
}
# bench/fidelity.py's default arm, written out (its sizes are the scale's)
SEARCH = {"replacement": "identity", "bcd.proposal": "informed", "bcd.scoring": "race", "bcd.rt": 2, "bcd.adt": 0.3,
          "bcd.criterion": "accuracy", "bcd.pool": 4.0, "bcd.temperature": 0.5, "finetune.optimizer": "adam",
          "finetune.lr": 1e-3, "finetune.step_schedule": "continuous", "finetune.epochs": 1}
ARMS = ("relus", "latency", "latency-equal", "latency-equal-compute")


def priced(model_path: str, protocol: str, network: str) -> dict:
    """A saved model's ReLUs, sites and predicted latency under the bench's protocol and network, and every
    protocol's costs (fastmask.cost.summary)."""
    load = cost.workload(load_model(model_path))
    return {"latency": cost.latency(load, cost.get_protocol(protocol), cost.parse_network(network)),
            "sites": load.sites, "relus": load.relus, "costs": cost.summary(load)}


def rows_of(summary: dict, arm: str, seed: int, protocol: str, network: str) -> list[dict]:
    out = Path(summary["config"]["out"])
    rows = []
    for method, key in (("BCD", "targets"), ("SNL", "snl_targets")):
        for t in summary.get(key, []):
            path = out / key / str(t["budget"]) / "model.safetensors"
            rows.append({"arm": arm, "method": method, "seed": seed, "budget": t["budget"],
                         "latency_target": t.get("latency_target"), "test_acc": t["test_acc"],
                         "val_acc": t["val_acc"], "image_passes": image_passes([t]),
                         **priced(str(path), protocol, network)})
    return rows


def extra_target_epochs(summary: dict, snl_passes: int) -> int:
    """Whole target finetune epochs to add so that a BCD run's last target spends as many image passes as SNL's
    `snl_passes` without passing them (floor: equal compute never in BCD's favour). The search's latency targets are
    the same, so it takes the same kind of steps; only the target finetune grows."""
    import math

    from fastmask.config import load_saved
    from fastmask.pipeline import run_dataset

    train_images = len(run_dataset(load_saved(Path(summary["config"]["out"]) / "config.yaml")).train_y)
    return max(0, math.floor((snl_passes - image_passes([summary["targets"][-1]])) / train_images))


def mean(rows: list[dict], key: str) -> float:
    return statistics.fmean(r[key] for r in rows)


def spread(rows: list[dict], key: str) -> float:
    return statistics.stdev(r[key] for r in rows) if len(rows) > 1 else 0.0


def markdown(payload: dict) -> str:
    rows, network, protocol = payload["rows"], payload["network"], payload["protocol"]
    s = payload["settings"]
    lines = [f"## Latency as the cost, scale {payload['scale']} (resnet18 width {s['model.width']}, B_ref "
             f"{s['snl.ref_budget']:,}, seeds {','.join(map(str, payload['seeds']))})", "",
             f"Predicted latency: {protocol} on {cost.parse_network(network)}. Test accuracy, mean (std) over seeds; "
             "image passes = images trained on + pushed forward.", "",
             "| arm | method | target | seeds | ReLUs | sites | WAN latency s | test % | std | val % | image passes |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        target = f"{r['latency_target']:.3f} s (SNL at {r['snl_budget']:,})" if r.get("latency_target") else \
            f"{r['budget']:,} ReLUs"
        groups.setdefault((ARMS.index(r["arm"]), r["method"], r.get("snl_budget") or r["budget"], target), []).append(r)
    for (arm, method, _, target), group in sorted(groups.items(), key=lambda kv: (-kv[0][2], kv[0][0], kv[0][1])):
        lines.append(f"| {ARMS[arm]} | {method} | {target} | {len(group)} | {mean(group, 'relus'):,.0f} | "
                     f"{mean(group, 'sites'):.1f} | {mean(group, 'latency'):.3f} | {mean(group, 'test_acc'):.2f} | "
                     f"{spread(group, 'test_acc'):.2f} | {mean(group, 'val_acc'):.2f} | "
                     f"{mean(group, 'image_passes'):,.0f} |")
    lines += ["", "Gaps, seed by seed (same start and seed), test points:", "",
              "| comparison | SNL budget | seeds | mean gap | std | per seed | latency BCD / SNL |",
              "| --- | ---: | ---: | ---: | ---: | --- | --- |"]
    for g in payload["gaps"]:
        lines.append(f"| {g['comparison']} | {g['budget']:,} | {len(g['gaps'])} | {g['mean']:+.2f} | {g['std']:.2f} | "
                     f"{', '.join(f'{x:+.2f}' for x in g['gaps'])} | {g['latency_bcd']:.3f} / {g['latency_snl']:.3f} |")
    return "\n".join(lines) + "\n"


def gaps(rows: list[dict]) -> list[dict]:
    """BCD minus SNL per seed: at the same ReLU budget (default and latency-aware BCD against SNL), and at the same
    predicted latency (latency-equal BCD against SNL at the budget whose latency it was given)."""
    snl = {(r["seed"], r["budget"]): r for r in rows if r["method"] == "SNL"}
    out = []
    comparisons = (("relus", "same ReLUs: BCD (relus) - SNL"), ("latency", "same ReLUs: BCD (latency) - SNL"),
                   ("latency-equal", "same latency: BCD (latency) - SNL"),
                   ("latency-equal-compute", "same latency and compute: BCD (latency) - SNL"))
    for arm, label in comparisons:
        pairs: dict[int, list[tuple[dict, dict]]] = {}
        for r in rows:
            if r["arm"] == arm and r["method"] == "BCD":
                budget = r.get("snl_budget") or r["budget"]
                if (r["seed"], budget) in snl:
                    pairs.setdefault(budget, []).append((r, snl[(r["seed"], budget)]))
        for budget, group in sorted(pairs.items(), reverse=True):
            values = [b["test_acc"] - s["test_acc"] for b, s in group]
            out.append({"comparison": label, "budget": budget, "gaps": values, "mean": statistics.fmean(values),
                        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                        "latency_bcd": statistics.fmean(b["latency"] for b, _ in group),
                        "latency_snl": statistics.fmean(s["latency"] for _, s in group)})
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="an .npz dataset (x_train, y_train, x_test, y_test, classes)")
    p.add_argument("--scale", choices=sorted(SCALES), default="small")
    p.add_argument("--seeds", default="0")
    p.add_argument("--protocol", default="crypten-public", choices=sorted(cost.PROTOCOLS))
    p.add_argument("--network", default="wan")
    p.add_argument("--device", default=None)
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "latency"))
    p.add_argument("--name", default=None)
    args = p.parse_args(argv)
    out, seeds = Path(args.out), [int(s) for s in args.seeds.split(",") if s.strip()]
    scale = SCALES[args.scale]
    pricing = {"bcd.protocol": args.protocol, "bcd.network": args.network}
    rows = []
    for seed in seeds:
        root = out / args.scale / f"seed{seed}"
        common = {"data.dataset": f"npz:{Path(args.data).resolve()}", "model.arch": "resnet18", "device": args.device,
                  "seed": seed, **scale}
        start = {**common, "finetune.optimizer": None, "finetune.lr": None}
        run(root / "start", start, stop_after="snl")
        begin = {"model.checkpoint": str(root / "start" / "snl" / "model.safetensors"),
                 "model.teacher": str(root / "start" / "baseline" / "model.safetensors"), **common, **SEARCH}
        relus = rows_of(run(root / "relus", {**begin, "method": "both"}), "relus", seed, args.protocol, args.network)
        rows += relus
        rows += rows_of(run(root / "latency", {**begin, "method": "bcd", "bcd.cost": "latency", **pricing}),
                        "latency", seed, args.protocol, args.network)
        snl = sorted((r for r in relus if r["method"] == "SNL"), key=lambda r: -r["budget"])
        goals = [r["latency"] for r in snl]
        equal = run(root / "latency-equal", {**begin, "method": "bcd", "bcd.cost": "latency", **pricing,
                                             "bcd.targets": None, "bcd.latency_targets": goals})
        given = equal["config"]["bcd"]["latency_targets"]  # as the run was given them (a reused run: its own)
        for r in rows_of(equal, "latency-equal", seed, args.protocol, args.network):
            r["snl_budget"] = snl[given.index(r["latency_target"])]["budget"]
            rows.append(r)
        # The same search, its target finetune lengthened until it has spent SNL's images at the last target
        extra = extra_target_epochs(equal, snl[-1]["image_passes"])
        matched = run(root / "latency-equal-compute",
                      {**begin, "method": "bcd", "bcd.cost": "latency", **pricing, "bcd.targets": None,
                       "bcd.latency_targets": given, "finetune.target_epochs": scale["finetune.target_epochs"] + extra})
        for r in rows_of(matched, "latency-equal-compute", seed, args.protocol, args.network):
            r["snl_budget"] = snl[given.index(r["latency_target"])]["budget"]
            rows.append(r)
    payload = {"scale": args.scale, "settings": scale, "search": SEARCH, "seeds": seeds, "protocol": args.protocol,
               "network": args.network, "machine": report.machine(), "data": Path(args.data).name, "rows": rows,
               "gaps": gaps(rows)}
    name = args.name or f"latency_{args.scale}"
    report.write_json(out / f"{name}.json", payload)
    text = markdown(payload)
    report.atomic_write_text(out / f"{name}.md", text)
    print(text)
    return payload


if __name__ == "__main__":
    main()
