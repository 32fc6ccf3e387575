"""The bodies of fastmask-export (ONNX + manifest + masks) and fastmask-pi (a two-party run under CrypTen or SecretFlow
SPU); fastmask.cli
runs them, so bad input ends in one line, `<prog>: error: ...`, and exit code 2, as with fastmask-linearize.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..errors import ArgumentParser, FastmaskError

RUN_SUMMARY = "summary.json"
RUNTIME_CHOICES = ("crypten", "spu-cheetah", "spu-semi2k")
RUN_CONFIG = "config.yaml"


# ---- fastmask-export ------------------------------------------------------------------------------------------------
def export_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="fastmask-export",
                       description="Export a fastmask checkpoint to ONNX for private inference: only kept ReLUs reach "
                       "a Relu node; a JSON manifest and the masks (safetensors) are written beside it.")
    p.add_argument("model", help="a fastmask .safetensors checkpoint (e.g. a run's targets/<budget>/model.safetensors)")
    p.add_argument("--out", help="the .onnx file to write (default: beside the checkpoint, same name)")
    p.add_argument("--no-check", action="store_true", help="skip the onnxruntime-vs-PyTorch check")
    return p


def export(argv: list[str]) -> None:
    from ..checkpoint import load_model
    from ..nn import masked_sites, relu_count
    from .export import companion_paths, export_model

    args = export_parser().parse_args(argv)
    out = Path(args.out) if args.out else Path(args.model).with_suffix(".onnx")
    model = load_model(args.model)
    manifest = export_model(model, out)
    manifest_path, masks_path = companion_paths(out)
    print(f"{out}: {len(manifest['sites'])} masked sites, {relu_count(model):,} of "
          f"{sum(site.mask.numel() for _, site in masked_sites(model)):,} ReLUs kept")
    print(f"manifest {manifest_path}, masks {masks_path}")
    if not args.no_check:
        print(_check_with_onnxruntime(model, out))


def _check_with_onnxruntime(model, path: Path) -> str:
    """One line: how far onnxruntime's logits are from PyTorch's on a few random inputs (skipped without it)."""
    import torch

    try:
        import onnxruntime
    except ImportError:
        return "onnxruntime is not installed: the exported graph was not run (pip install -e .[pi])"
    spec = model.fastmask_spec
    x = torch.randn(4, spec.get("in_channels", 3), spec["image_size"], spec["image_size"],
                    generator=torch.Generator().manual_seed(0))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    model.eval()
    with torch.no_grad():
        expected = model(x)
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    difference = float((got - expected).abs().max())
    return f"onnxruntime vs PyTorch on 4 random inputs: max |logit difference| {difference:.2e}"


# ---- fastmask-pi ----------------------------------------------------------------------------------------------------
def pi_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="fastmask-pi",
                       description="Run a fastmask model as a two-party computation on this machine (two processes, "
                       "localhost) and compare it with its all-ReLU version: bytes, rounds or send actions, time, "
                       "agreement with plaintext.")
    p.add_argument("model", nargs="?",
                   help="a fastmask .safetensors checkpoint (e.g. a run's targets/<budget>/model.safetensors)")
    p.add_argument("--runtime", default="crypten", choices=RUNTIME_CHOICES,
                   help="crypten (CrypTen 0.4.1, party 0 deals the triples; the default), spu-cheetah (SecretFlow "
                   "SPU's Cheetah: two parties, no dealer) or spu-semi2k (SPU, party 0 deals the triples); SPU runs in "
                   "its own environment, see --install-runtime")
    p.add_argument("--install-runtime", choices=("spu",),
                   help="create the separate environment SecretFlow SPU runs in (one time, about 1 GB) and exit")
    p.add_argument("--images", type=int, default=20, help="test images to run privately (default 20)")
    p.add_argument("--dataset", help="default: the run's dataset when the model sits in a run folder, else digits (a "
                                     "folder: dataset is read at the model's image size)")
    p.add_argument("--data-dir", help="folder holding the dataset (cifar/tinyimagenet)")
    p.add_argument("--baseline", help="checkpoint to compare with (default: the model with every mask 1)")
    p.add_argument("--modes", default="public,secret", help="public, secret, or public,secret (the default)")
    p.add_argument("--out", default="fastmask_pi", help="folder for pi.json, pi.md and the ONNX files")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds the two-party run may take (default 3600)")
    p.add_argument("--predict", action="store_true",
                   help="predict bytes, rounds and latency per protocol and network (fastmask.cost) without running "
                   "the two parties; writes predict.json and predict.md")
    p.add_argument("--protocol", action="append",
                   help="with --predict: a protocol to predict for (repeatable; default: all of fastmask.cost's)")
    p.add_argument("--network", action="append",
                   help="with --predict: lan, wan or BANDWIDTH_MBIT,RTT_MS (repeatable; default: lan and wan)")
    return p


@dataclass
class RunModel:
    """Where a checkpoint sits in a fastmask run: the run's out dir, the model's folder, and the summary.json entry
    that describes it (section "targets" or "snl_targets" with a budget, or "snl")."""

    run_dir: Path
    folder: Path
    section: str
    budget: Optional[int] = None


def run_model(model_path: str | Path) -> Optional[RunModel]:
    """The run a checkpoint belongs to, when it is a run's targets/<budget>/, snl_targets/<budget>/ or snl/ model
    (in an out dir holding summary.json); else None."""
    folder = Path(model_path).resolve().parent
    if folder.parent.name in ("targets", "snl_targets") and folder.name.isdigit():
        if (folder.parent.parent / RUN_SUMMARY).is_file():
            return RunModel(folder.parent.parent, folder, folder.parent.name, int(folder.name))
    if folder.name == "snl" and (folder.parent / RUN_SUMMARY).is_file():
        return RunModel(folder.parent, folder, "snl")
    return None


def _resolve_dataset(args, target: Optional[RunModel], spec: dict) -> tuple[str, Optional[str], dict]:
    """(dataset, data dir, the folder settings: image size, mean, std) from the flags, else the model's run."""
    from ..config import load_saved

    run = load_saved(target.run_dir / RUN_CONFIG) if target is not None else None
    dataset = args.dataset or (run.data.dataset if run else None) or "digits"
    data_dir = args.data_dir or (run.data.data_dir if run else None)
    if args.data_dir is not None and not Path(args.data_dir).is_dir():
        raise FastmaskError(f"data dir {args.data_dir} does not exist; point --data-dir at the dataset folder")
    folder = {}
    if str(dataset).lower().startswith("folder:"):
        same_run = run is not None and args.dataset in (None, run.data.dataset)
        folder = {"image_size": spec.get("image_size"),
                  "mean": run.data.mean if same_run else None, "std": run.data.std if same_run else None}
    return str(dataset), data_dir, folder


def pi(argv: list[str]) -> None:
    from .. import data, report
    from ..checkpoint import load_model, read_spec
    from .measure import all_relu_copy, compare, table, write_results

    args = pi_parser().parse_args(argv)
    if args.install_runtime:
        from .spu_env import install

        install()
        return
    if args.model is None:
        raise FastmaskError("the following arguments are required: model")
    if args.predict:
        _predict(args)
        return
    if args.protocol or args.network:
        raise FastmaskError("--protocol and --network go with --predict; a two-party run measures its --runtime")
    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    if not modes or any(m not in ("public", "secret") for m in modes):
        raise FastmaskError(f"--modes takes public, secret or public,secret; got {args.modes!r}")
    if args.images < 1:
        raise FastmaskError(f"--images must be at least 1, got {args.images}")
    # before any work: a missing runtime is one line, not a traceback after the export
    if args.runtime == "crypten":
        from .crypten_compat import import_crypten

        import_crypten()
    else:
        from .spu_env import require

        require()
    target = run_model(args.model)
    spec, _ = read_spec(args.model)
    dataset_name, data_dir, folder = _resolve_dataset(args, target, spec)
    dataset = data.load_dataset(dataset_name, data_dir, **folder)
    expected = {"num_classes": dataset.num_classes, "image_size": dataset.image_size,
                "in_channels": dataset.in_channels}
    got = {"num_classes": spec.get("num_classes"), "image_size": spec.get("image_size"),
           "in_channels": spec.get("in_channels", 3)}
    if got != expected:
        raise FastmaskError(f"{args.model} takes {got['in_channels']}x{got['image_size']}x{got['image_size']} images "
                            f"and {got['num_classes']} classes, but {dataset.name} has {dataset.in_channels}x"
                            f"{dataset.image_size}x{dataset.image_size} and {dataset.num_classes}; pass the model's "
                            "--dataset")
    model = load_model(args.model, expected=expected)
    if args.baseline:
        baseline, baseline_label = load_model(args.baseline, expected=expected), str(args.baseline)
    else:
        baseline, baseline_label = all_relu_copy(model), "all-ReLU (same weights)"
    count = min(args.images, len(dataset.test_y))
    if count < args.images:
        print(f"[fastmask-pi] the {dataset.name} test split has {count} images; running all of them")
    images = data.normalize(dataset.test_x[:count], dataset, "cpu")
    labels = dataset.test_y[:count]
    model_label = str(Path(args.model).resolve().relative_to(target.run_dir)) if target else str(args.model)
    parties = "CrypTen" if args.runtime == "crypten" else f"SPU ({args.runtime.split('-', 1)[1]})"
    print(f"[fastmask-pi] {dataset.name}: {count} test images, modes {', '.join(modes)}; two {parties} parties on "
          "localhost, one image at a time")
    started = time.perf_counter()
    out = Path(args.out)
    rows = compare([(model_label, "model", model), (baseline_label, "baseline", baseline)], images, labels,
                   out / "onnx", modes=modes, timeout=args.timeout, runtime=args.runtime)
    write_results(rows, out)
    written = [out / "pi.json", out / "pi.md"]
    if target is not None:
        kept = write_results(rows, target.folder)
        written += [target.folder / "pi.json", target.folder / "pi.md",
                    report.attach_pi(target.run_dir, target.section, target.budget, kept)]
    print(table(rows), end="")
    print(f"[fastmask-pi] done in {time.perf_counter() - started:.0f}s; wrote {', '.join(map(str, written))}")



def _predict(args) -> None:
    from .. import cost
    from ..checkpoint import load_model
    from ..files import atomic_write_text
    from .measure import all_relu_copy
    from .predict import predictions, table

    protocols = args.protocol or list(cost.PROTOCOLS)
    for name in protocols:
        cost.get_protocol(name)
    networks = {n.name: n for n in map(cost.parse_network, args.network or list(cost.NETWORKS))}
    model = load_model(args.model)
    baseline = (load_model(args.baseline), str(args.baseline)) if args.baseline else \
        (all_relu_copy(model), "all-ReLU (same weights)")
    rows = predictions([(str(args.model), model), (baseline[1], baseline[0])], protocols, networks)
    out = Path(args.out)
    text = table(rows, networks)
    atomic_write_text(out / "predict.json", json.dumps(rows, indent=2) + "\n")
    atomic_write_text(out / "predict.md", text)
    print(text, end="")
    print(f"[fastmask-pi] predicted, no two-party run; wrote {out / 'predict.json'}, {out / 'predict.md'}")
