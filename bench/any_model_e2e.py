"""End to end on torchvision models: fastmask-linearize -> fastmask-export -> fastmask-pi, per model and dataset form.

From an .npz of 32x32 RGB images (x_train, y_train, x_test, y_test) the script makes a small subset (--classes
classes, --per-class train images each) as an .npz and as an image folder (train/ and test/ of PNGs at 40x36, so
the folder's resize and center crop are exercised), then for each model and each form:
1. fastmask-linearize with small settings (a short baseline, SNL to half the ReLUs, BCD to two targets below);
2. for every target: the checkpoint's ReLU count against the target, fastmask-export (the ONNX graph's Relu elements
   per image against relu_count; onnxruntime against PyTorch on real test images, max |logit difference|, the
   logits' scale and their ratio);
3. fastmask-pi (public weights) on --pi-images test images: agreement of decrypted and plaintext predictions, and the
   CrypTen seconds (wall and CPU) per image of the target's model.
Results go to <out>/e2e.json and a table on stdout.

The graph runs in float32: onnxruntime's CPU provider has no float64 kernels for Conv, AveragePool or
GlobalAveragePool (checked with onnxruntime 1.32: "Could not find an implementation for Conv(11)"), so the graph
cannot be checked in double there. What says the graph is exact is the relative difference, max |logit difference| /
max |logit|: float32 rounding over a deep network's layers keeps it near 1e-7 to 1e-6, while a wrong node or a
misplaced mask moves logits by their own order. Barely trained models can have logits in the thousands, so the
absolute difference alone (1e-3 there) says little.

Run: OMP_NUM_THREADS=1 python bench/any_model_e2e.py --npz <cifar10 .npz> --out <folder>
     [--models torchvision:resnet50,torchvision:vgg11_bn] [--forms npz,folder]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fastmask as fm  # noqa: E402
from fastmask import cli, data  # noqa: E402
from fastmask.checkpoint import load_model  # noqa: E402
from fastmask.pi.export import build_onnx, relu_elements  # noqa: E402

MODELS = "torchvision:resnet50,torchvision:vgg11_bn,torchvision:densenet121,torchvision:regnet_x_400mf"


def make_inputs(npz: Path, out: Path, classes: int, per_class: int, test_per_class: int) -> dict[str, str]:
    from PIL import Image

    source = np.load(npz, allow_pickle=False)
    subset = {}
    for split, per in (("train", per_class), ("test", test_per_class)):
        x, y = source[f"x_{split}"], source[f"y_{split}"]
        keep = np.concatenate([np.flatnonzero(y == c)[:per] for c in range(classes)])
        keep.sort()
        subset[f"x_{split}"], subset[f"y_{split}"] = x[keep], y[keep].astype(np.int64)
    path = out / "subset.npz"
    np.savez(path, **subset)
    folder = out / "folder"
    if not folder.is_dir():
        for split in ("train", "test"):
            for i, (image, label) in enumerate(zip(subset[f"x_{split}"], subset[f"y_{split}"])):
                target = folder / split / f"class{label}"
                target.mkdir(parents=True, exist_ok=True)
                Image.fromarray(image).resize((40, 36), Image.BILINEAR).save(target / f"{i}.png")
    return {"npz": f"npz:{path}", "folder": f"folder:{folder}"}


def total_relus(arch: str, classes: int) -> int:
    from fastmask.models import external

    return fm.MaskSet(external.build(arch, classes, 32)).total()


def run_one(arch: str, form: str, dataset: str, out: Path, classes: int, pi_images: int, epochs: int) -> dict:
    total = total_relus(arch, classes)
    ref = total // 2
    targets = [int(ref * 0.9), int(ref * 0.8)]
    drc = max(1, (ref - targets[-1]) // 4)
    run = out / "runs" / f"{arch.split(':')[-1]}-{form}"
    argv = ["--dataset", dataset, "--arch", arch, "--baseline-epochs", str(epochs), "--ref-budget", str(ref),
            "--snl-epochs", "1", "--snl-lambda0", "1e-3", "--snl-finetune-epochs", "1",
            "--targets", ",".join(map(str, targets)), "--drc", str(drc), "--rt", "2", "--finetune-epochs", "1",
            "--finetune-max-steps", "2", "--finetune-target-epochs", "1", "--score-subset", "64", "--adt", "5",
            "--device", "cpu", "--quiet", "--out", str(run)]
    if form == "folder":
        argv += ["--image-size", "32"]
    started = time.perf_counter()
    resume = ["--resume"] if (run / "config.yaml").is_file() else []
    code = cli.main(argv + resume)
    row = {"arch": arch, "form": form, "total_relus": total, "ref_budget": ref, "exit": code,
           "linearize_s": round(time.perf_counter() - started, 1), "targets": []}
    if code != 0:
        return row
    name = dataset
    dataset_obj = data.load_dataset(name, image_size=32 if form == "folder" else None)
    images = data.normalize(dataset_obj.test_x[:16], dataset_obj, "cpu")
    import onnxruntime

    for budget in targets:
        path = run / "targets" / str(budget) / "model.safetensors"
        model = load_model(path).eval()
        proto, manifest, _ = build_onnx(model)
        session = onnxruntime.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
        with torch.no_grad():
            expected = model(images)
        got = torch.from_numpy(session.run(None, {"input": images.numpy()})[0])
        entry = {"budget": budget, "relu_count": fm.relu_count(model), "onnx_relu_elements": relu_elements(proto),
                 "ort_max_abs_diff": float((got - expected).abs().max()),
                 "logit_scale": float(expected.abs().max())}
        entry["ort_rel_diff"] = entry["ort_max_abs_diff"] / entry["logit_scale"]
        assert cli.export_main([str(path), "--no-check"]) == 0
        pi_out = run / "pi" / str(budget)
        t0 = time.perf_counter()
        code = cli.pi_main([str(path), "--images", str(pi_images), "--modes", "public", "--out", str(pi_out)])
        entry["pi_exit"] = code
        entry["pi_s"] = round(time.perf_counter() - t0, 1)
        if code == 0:
            rows = json.loads((pi_out / "pi.json").read_text())
            model_row = next(r for r in rows if r["role"] == "model")
            entry["pi_agreement"] = model_row["agreement"]
            entry["pi_seconds_per_image"] = model_row["seconds_per_image"]
            entry["pi_cpu_seconds_per_image"] = model_row["cpu_seconds_per_image"]
            entry["pi_agreement_all_relu"] = next(r["agreement"] for r in rows if r["role"] == "baseline")
        row["targets"].append(entry)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--npz", required=True, help="an .npz of 32x32 RGB images (x_train, y_train, x_test, y_test)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--models", default=MODELS)
    parser.add_argument("--forms", default="npz,folder")
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--test-per-class", type=int, default=20)
    parser.add_argument("--pi-images", type=int, default=4)
    parser.add_argument("--baseline-epochs", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    datasets = make_inputs(Path(args.npz), out, args.classes, args.per_class, args.test_per_class)
    results_path = out / "e2e.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else []
    for arch in args.models.split(","):
        for form in args.forms.split(","):
            row = run_one(arch, form, datasets[form], out, args.classes, args.pi_images, args.baseline_epochs)
            results = [r for r in results if (r["arch"], r["form"]) != (arch, form)] + [row]
            results_path.write_text(json.dumps(results, indent=2) + "\n")
            for t in row["targets"]:
                print(f"{arch} {form} target {t['budget']}: relu_count {t['relu_count']}, ONNX Relu elements "
                      f"{t['onnx_relu_elements']}, onnxruntime max diff {t['ort_max_abs_diff']:.2e} (logits up to "
                      f"{t['logit_scale']:.2f}, relative {t['ort_rel_diff']:.1e}), pi agreement "
                      f"{t.get('pi_agreement')}, {t.get('pi_seconds_per_image')} s/image (CPU "
                      f"{t.get('pi_cpu_seconds_per_image')} s)", flush=True)
            if row["exit"] != 0:
                print(f"{arch} {form}: fastmask-linearize exited {row['exit']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
