"""The PI comparison behind fastmask-pi: a masked model next to a baseline (its all-ReLU version by default), each
run as a two-party computation in both weight modes, with the agreement of decrypted and plaintext predictions."""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from ..errors import FastmaskError
from ..files import atomic_write_text
from ..nn import masked_sites, relu_count
from .export import export_model
from .two_party import MODES, run_two_party

DEALER_NOTE = ("CrypTen's default (TFP) lets party 0 act as a trusted dealer of the multiplication triples, so no byte "
               "of triple generation is counted: these are not the bytes of an HE+GC protocol such as Delphi or "
               "Cheetah. Compare the rows with each other, not with those papers.")
MODE_NOTE = {"public": "weights public to both parties: convolutions local, the ReLUs alone are paid",
             "secret": "weights secret-shared by the server too: linear layers cost multiplications as well"}
ROW_KEYS = ("model", "role", "mode", "relu_count", "bytes", "rounds", "seconds_per_image", "agreement", "accuracy",
            "images")


def all_relu_copy(model: nn.Module) -> nn.Module:
    """The same weights with every mask 1: the model's all-ReLU version."""
    baseline = copy.deepcopy(model)
    for _, site in masked_sites(baseline):
        site.mask.fill_(True)
    return baseline


def compare(models: list[tuple[str, str, nn.Module]], images: torch.Tensor, labels: torch.Tensor, work: Path,
            modes: tuple[str, ...] = MODES, timeout: float = 3600.0) -> list[dict]:
    """models: [(label, role, model)]; images normalized [N, C, H, W]. Exports each model to work/<role>.onnx and
    returns one row per (mode, model): bytes and rounds per image, seconds per image, agreement with plaintext."""
    if any(mode not in MODES for mode in modes) or not modes:
        raise FastmaskError(f"modes must be among {', '.join(MODES)}, got {', '.join(modes) or 'none'}")
    plaintext, paths = {}, {}
    for _, role, model in models:
        model.eval()
        with torch.no_grad():
            plaintext[role] = model(images).argmax(1)
        paths[role] = work / f"{role}.onnx"
        export_model(model, paths[role])
    jobs = [{"name": role, "onnx": str(paths[role]), "mode": mode} for mode in modes for _, role, _ in models]
    results = run_two_party(jobs, images, timeout=timeout)
    info = {role: (label, relu_count(model)) for label, role, model in models}
    rows = []
    for result in results:
        role = result["name"]
        predictions = result["logits"].argmax(1)
        rows.append({"model": info[role][0], "role": role, "mode": result["mode"], "relu_count": info[role][1],
                     "bytes": int(round(result["bytes"])), "rounds": int(round(result["rounds"])),
                     "seconds_per_image": round(float(result["seconds_per_image"]), 4),
                     "agreement": round(float((predictions == plaintext[role]).double().mean()), 6),
                     "accuracy": round(float((predictions == labels).double().mean()), 6),
                     "images": int(images.shape[0])})
    return rows


def ratios(rows: list[dict], mode: str = "public") -> Optional[dict]:
    """bytes(model) / bytes(baseline) next to relu_count(model) / relu_count(baseline), for one mode."""
    by_role = {row["role"]: row for row in rows if row["mode"] == mode}
    model, baseline = by_role.get("model"), by_role.get("baseline")
    if model is None or baseline is None or not baseline["bytes"] or not baseline["relu_count"]:
        return None
    return {"mode": mode, "bytes_ratio": model["bytes"] / baseline["bytes"],
            "relu_ratio": model["relu_count"] / baseline["relu_count"]}


def table(rows: list[dict]) -> str:
    """The rows as a markdown table, with the notes a reader needs to read the bytes right."""
    lines = ["| model | mode | ReLUs | bytes/image | rounds/image | s/image | agreement | accuracy |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in rows:
        lines.append(f"| {row['model']} | {row['mode']} | {row['relu_count']:,} | {row['bytes']:,} | {row['rounds']} | "
                     f"{row['seconds_per_image']:.3f} | {100 * row['agreement']:.1f}% | "
                     f"{100 * row['accuracy']:.1f}% |")
    lines.append("")
    for mode in dict.fromkeys(row["mode"] for row in rows):
        lines.append(f"- {mode}: {MODE_NOTE[mode]}.")
        ratio = ratios(rows, mode)
        if ratio:
            lines.append(f"  bytes model/baseline {ratio['bytes_ratio']:.4f}; ReLU count model/baseline "
                         f"{ratio['relu_ratio']:.4f}.")
    lines.append(f"- agreement: decrypted predictions equal to plaintext PyTorch's, over {rows[0]['images']} test "
                 "images; accuracy: against the labels.")
    lines.append(f"- {DEALER_NOTE}")
    return "\n".join(lines) + "\n"


def write_results(rows: list[dict], folder: Path) -> list[Path]:
    """pi.json (the list of rows) and pi.md (the table) in folder, each written atomically."""
    written = []
    for name, text in (("pi.json", json.dumps(rows, indent=2) + "\n"), ("pi.md", table(rows))):
        atomic_write_text(folder / name, text)
        written.append(folder / name)
    return written
