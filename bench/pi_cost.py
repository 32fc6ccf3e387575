"""Fits fastmask.cost's CrypTen (or SPU Cheetah) units from real two-party runs and prints every run's residual.

    python bench/pi_cost.py                       # resnet18 width 4 on 16x16 digits, 2 images per run: ~2 minutes
    python bench/pi_cost.py --width 8 --images 4  # the offline default's model size
    python bench/pi_cost.py --runtime spu-cheetah # SPU's Cheetah, public weights (its environment: fastmask-pi
                                                  # --install-runtime spu); rounds are its send actions

Runs CrypTen (two processes on localhost, fastmask.pi.two_party) on models with different masks: all ReLUs; 30%
kept; 8% kept with four sites emptied; 3% kept with nine sites emptied; and the polynomial replacement at 20% kept
with two sites emptied; each with public and with secret weights. Fits bytes, rounds and compute seconds per protocol
(fastmask.cost.fit) on the first four models of each mode plus the polynomial one, and prints the fitted units beside
the shipped ones (fastmask.cost.PROTOCOLS) and each run's error under both. Writes pi_cost.json and pi_cost.md into
--out.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import fastmask as fm  # noqa: E402
from fastmask import cost, data, report  # noqa: E402
from fastmask.pi.export import export_model  # noqa: E402
from fastmask.pi.spu_runtime import run_spu  # noqa: E402
from fastmask.pi.two_party import run_two_party  # noqa: E402

# (label, fraction of positions kept, sites emptied, polynomial)
MASKS = (("all ReLUs", 1.0, 0, False), ("30% kept", 0.3, 0, False), ("8% kept, 4 sites empty", 0.08, 4, False),
         ("3% kept, 9 sites empty", 0.03, 9, False), ("polynomial, 20% kept, 2 sites empty", 0.2, 2, True))
RUNTIMES = {"crypten": {"public": "crypten-public", "secret": "crypten-secret"},
            "spu-cheetah": {"public": "spu-cheetah-public"}}


def masked_model(width: int, fraction: float, emptied: int, polynomial: bool, images: torch.Tensor,
                 seed: int = 0) -> torch.nn.Module:
    """resnet18 on 16x16 one-channel images with random masks (the `emptied` sites with the fewest positions all
    zero), BatchNorm statistics from the images; polynomial sites get random quadratic coefficients."""
    torch.manual_seed(seed)
    model = fm.models.create("resnet18", 10, 16, width=width, in_channels=1, polynomial=polynomial)
    generator = torch.Generator().manual_seed(seed + 1)
    sites = fm.masked_sites(model)
    smallest = sorted(range(len(sites)), key=lambda i: (sites[i][1].mask.numel(), -i))[:emptied]
    for index, (_, site) in enumerate(sites):
        keep = torch.rand(site.mask.shape, generator=generator) < fraction
        site.mask.copy_(keep & (index not in smallest))
        if site.coeffs is not None:
            site.coeffs.data = 0.05 * torch.randn(site.coeffs.shape, generator=generator) + torch.tensor([0, 1.0, 0])
    model.train()
    with torch.no_grad():  # BN statistics of real images, so activations have realistic signs
        for _ in range(3):
            model(images)
    return model.eval()


def measure(width: int, count: int, work: Path, runtime: str) -> list[cost.Measurement]:
    dataset = data.load_dataset("digits")
    images = data.normalize(dataset.test_x[:64], dataset, "cpu")
    jobs, loads = [], {}
    for label, fraction, emptied, polynomial in MASKS:
        model = masked_model(width, fraction, emptied, polynomial, images)
        path = work / f"{len(loads)}.onnx"
        export_model(model, path)
        loads[label] = cost.workload(model)
        jobs += [{"name": label, "onnx": str(path), "mode": mode} for mode in RUNTIMES[runtime]]
    if runtime == "crypten":
        results = run_two_party(jobs, images[:count], timeout=1800)
    else:
        results = run_spu(jobs, images[:count], protocol=runtime.split("-", 1)[1], timeout=1800)
    if runtime == "crypten":
        return [cost.Measurement(loads[r["name"]], RUNTIMES[runtime][r["mode"]], r["bytes"], r["rounds"],
                                 r["seconds_per_image"]) for r in results]
    # SPU: the steady run of one image (its silent-OT refills come and go with the images run; bench/PI.md)
    return [cost.Measurement(loads[r["name"]], RUNTIMES[runtime][r["mode"]], r["steady_bytes"],
                             r["steady_send_actions"], r["seconds_per_image"]) for r in results]


def markdown(payload: dict) -> str:
    lines = [f"{payload['runtime']} units fitted from {payload['images']} image(s) per run, resnet18 width "
             f"{payload['width']} on 16x16 digits (bench/pi_cost.py).", "",
             "| protocol | bytes/ReLU | rounds/site | bytes fixed | rounds fixed | bytes/product | rounds/product site "
             "| s fixed | s/ReLU | s/site |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, units in payload["fitted"].items():
        lines.append(f"| {name} (fitted) | {units['bytes_per_relu']:.2f} | {units['rounds_per_site']:.3f} | "
                     f"{units['bytes_fixed']:.1f} | {units['rounds_fixed']:.2f} | {units['bytes_per_product']:.2f} | "
                     f"{units['rounds_per_product_site']:.2f} | {units['seconds_fixed']:.4f} | "
                     f"{units['seconds_per_relu']:.2e} | {units['seconds_per_site']:.4f} |")
    lines += ["", "| protocol | model | ReLUs | sites | products | bytes | predicted (shipped) | error % | rounds | "
              "predicted (shipped) | error % | s/image | predicted s |",
              "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in payload["shipped_residuals"]:
        predicted_s = "" if row["predicted_seconds"] is None else f"{row['predicted_seconds']:.3f}"
        lines.append(f"| {row['protocol']} | {row['model']} | {row['relus']:,} | {row['sites']} | "
                     f"{row['products']:,} | "
                     f"{row['bytes']:,.0f} | {row['predicted_bytes']:,.0f} | {row['bytes_error_percent']:+.2f} | "
                     f"{row['rounds']:.0f} | {row['predicted_rounds']:.0f} | {row['rounds_error_percent']:+.2f} | "
                     f"{row['seconds']:.3f} | {predicted_s} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=4)
    parser.add_argument("--images", type=int, default=2, help="images per run (one at a time)")
    parser.add_argument("--runtime", default="crypten", choices=sorted(RUNTIMES),
                        help="spu-cheetah: rounds are SPU's send actions")
    parser.add_argument("--out", default=None, help="default bench/results/pi_cost_<runtime>")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fastmask-pi-cost-") as work:
        runs = measure(args.width, args.images, Path(work), args.runtime)
    labels = [label for label, *_ in MASKS] * 1
    fitted, shipped_rows = {}, []
    modes = RUNTIMES[args.runtime]
    for name in modes.values():
        mine = [m for m in runs if m.protocol == name]
        protocol, _ = cost.fit(mine, cost.FIT_STARTS[name])
        fitted[name] = dataclasses.asdict(protocol)
        for label, row in zip(labels, cost.residuals(mine, cost.FIT_STARTS[name])):
            shipped_rows.append({"protocol": name, "model": label, **row})
    payload = {"width": args.width, "images": args.images, "machine": report.machine(), "fitted": fitted,
               "runtime": args.runtime,
               "shipped": {name: dataclasses.asdict(cost.FIT_STARTS[name]) for name in modes.values()},
               "shipped_residuals": shipped_rows}
    out = Path(args.out or REPO / "bench" / "results" / f"pi_cost_{args.runtime}")
    report.write_json(out / "pi_cost.json", payload)
    text = markdown(payload)
    report.atomic_write_text(out / "pi_cost.md", text)
    print(text)
    return payload


if __name__ == "__main__":
    main()
