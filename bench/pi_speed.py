"""Seconds per image of a masked model against its all-ReLU version under CrypTen, measured fairly on a machine whose
load changes: the two models alternate, job after job, in the same two party processes.

    python bench/pi_speed.py fastmask_runs/digits/targets/1200/model.safetensors --rounds 3 --images 10

Prints, per model, the wall and CPU seconds per image of each job and their means, and the ratio model / all-ReLU.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fastmask import data  # noqa: E402
from fastmask.checkpoint import load_model  # noqa: E402
from fastmask.pi.export import export_model  # noqa: E402
from fastmask.pi.measure import all_relu_copy  # noqa: E402
from fastmask.pi.two_party import run_two_party  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="a fastmask checkpoint on the digits data (the offline default's targets)")
    p.add_argument("--rounds", type=int, default=3, help="jobs per model, alternating")
    p.add_argument("--images", type=int, default=10, help="test images per job")
    p.add_argument("--mode", default="public", choices=("public", "secret"))
    args = p.parse_args(argv)
    dataset = data.load_dataset("digits")
    images = data.normalize(dataset.test_x[:args.images], dataset, "cpu")
    model = load_model(args.model)
    with tempfile.TemporaryDirectory(prefix="fastmask-pi-speed-") as work:
        paths = {"model": Path(work) / "model.onnx", "all-ReLU": Path(work) / "all_relu.onnx"}
        export_model(model, paths["model"])
        export_model(all_relu_copy(model), paths["all-ReLU"])
        jobs = [{"name": name, "onnx": str(path), "mode": args.mode}
                for _ in range(args.rounds) for name, path in paths.items()]
        results = run_two_party(jobs, images, timeout=3600)
    summary = {}
    for name in paths:
        mine = [r for r in results if r["name"] == name]
        summary[name] = {"wall": [r["seconds_per_image"] for r in mine],
                         "cpu": [r["cpu_seconds_per_image"] for r in mine]}
        wall, cpu = summary[name]["wall"], summary[name]["cpu"]
        print(f"{name:9s} wall s/image {' '.join(f'{w:.3f}' for w in wall)} mean {statistics.fmean(wall):.3f}; "
              f"CPU s/image {' '.join(f'{c:.3f}' for c in cpu)} mean {statistics.fmean(cpu):.3f}")
    for kind in ("wall", "cpu"):
        ratio = statistics.fmean(summary["model"][kind]) / statistics.fmean(summary["all-ReLU"][kind])
        print(f"model / all-ReLU, {kind}: {ratio:.3f}")
    return summary


if __name__ == "__main__":
    main()
