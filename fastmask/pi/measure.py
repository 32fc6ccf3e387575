"""The PI comparison behind fastmask-pi: a masked model next to a baseline (its all-ReLU version by default), each
run as a two-party computation in both weight modes, with the agreement of decrypted and plaintext predictions.

Runtimes: "crypten" (CrypTen 0.4.1, fastmask.pi.two_party) and "spu-cheetah" / "spu-semi2k" (SecretFlow SPU in its
own environment, fastmask.pi.spu_runtime). Every row says which runtime and protocol measured it and whether that
protocol has a dealer, so rows of different runtimes can sit in one table without being mistaken for each other."""
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
RUNTIMES = {
    "crypten": {"protocol": "crypten-tfp", "dealer": True, "note": DEALER_NOTE},
    "spu-cheetah": {"protocol": "cheetah", "dealer": False, "note": (
        "SPU's Cheetah (SecretFlow SPU 0.9.5, FM64) is a two-party protocol with no dealer: silent OT for ReLUs and "
        "truncations, HE for secret x secret products. Online bytes are payload bytes sent by both parties per "
        "image, input and output shares included; setup bytes (OT setup, and the weight shares in secret mode) are "
        "paid once per model and connection and are not in the online bytes. With public weights each convolution "
        "still sends 3 bytes per output element (the truncation of its fixed-point output), however many ReLUs "
        "follow it, so the bytes fall slower than the ReLU count. The bytes and send actions are means over the "
        "images: Cheetah now and then refills its silent-OT pool within a run (steady_bytes and "
        "steady_send_actions in pi.json: the median image). SPU counts send actions, not rounds.")},
    "spu-semi2k": {"protocol": "semi2k-tfp", "dealer": True, "note": (
        "SPU's SEMI2K here uses trusted-first-party Beaver triples: party 0 deals them, as in CrypTen's default, so "
        "its bytes are not those of a dealer-free protocol. SPU counts send actions, not rounds.")},
}
MODE_NOTE = {"public": "weights public to both parties: convolutions local, the ReLUs alone are paid",
             "secret": "weights secret-shared by the server too: linear layers cost multiplications as well"}
ROW_KEYS = ("runtime", "protocol", "dealer", "model", "role", "mode", "relu_count", "bytes", "setup_bytes",
            "send_actions", "rounds", "seconds_per_image", "cpu_seconds_per_image", "agreement", "accuracy", "images")


def all_relu_copy(model: nn.Module) -> nn.Module:
    """The same weights with every mask 1: the model's all-ReLU version."""
    baseline = copy.deepcopy(model)
    for _, site in masked_sites(baseline):
        site.mask.fill_(True)
    return baseline


def compare(models: list[tuple[str, str, nn.Module]], images: torch.Tensor, labels: torch.Tensor, work: Path,
            modes: tuple[str, ...] = MODES, timeout: float = 3600.0, runtime: str = "crypten") -> list[dict]:
    """models: [(label, role, model)]; images normalized [N, C, H, W]. Exports each model to work/<role>.onnx, runs
    them under `runtime` and returns one row per (mode, model): online bytes per image, setup bytes (SPU; None where
    the runtime does not separate them), send actions (SPU) and rounds (CrypTen) per image, seconds per image,
    agreement with plaintext. SPU rows also carry op_bytes, the online bytes split by SPU op, and steady_bytes and
    steady_send_actions, the median image's (see fastmask.pi.spu_runtime)."""
    if any(mode not in MODES for mode in modes) or not modes:
        raise FastmaskError(f"modes must be among {', '.join(MODES)}, got {', '.join(modes) or 'none'}")
    if runtime not in RUNTIMES:
        raise FastmaskError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    plaintext, paths = {}, {}
    for _, role, model in models:
        model.eval()
        with torch.no_grad():
            plaintext[role] = model(images).argmax(1)
        paths[role] = work / f"{role}.onnx"
        export_model(model, paths[role])
    jobs = [{"name": role, "onnx": str(paths[role]), "mode": mode} for mode in modes for _, role, _ in models]
    if runtime == "crypten":
        results = run_two_party(jobs, images, timeout=timeout)
    else:
        from .spu_runtime import run_spu

        results = run_spu(jobs, images, protocol=runtime.split("-", 1)[1], timeout=timeout)
    info = {role: (label, relu_count(model)) for label, role, model in models}
    described = RUNTIMES[runtime]
    rows = []
    for result in results:
        role = result["name"]
        predictions = result["logits"].argmax(1)
        rounds, setup, actions = result.get("rounds"), result.get("setup_bytes"), result.get("send_actions")
        row = {"runtime": runtime, "protocol": described["protocol"], "dealer": described["dealer"],
               "model": info[role][0], "role": role, "mode": result["mode"], "relu_count": info[role][1],
               "bytes": int(round(result["bytes"])),
               "setup_bytes": None if setup is None else int(round(setup)),
               "send_actions": None if actions is None else int(round(actions)),
               "rounds": None if rounds is None else int(round(rounds)),
               "seconds_per_image": round(float(result["seconds_per_image"]), 4),
               "cpu_seconds_per_image": (None if result.get("cpu_seconds_per_image") is None else
                                         round(float(result["cpu_seconds_per_image"]), 4)),
               "agreement": round(float((predictions == plaintext[role]).double().mean()), 6),
               "accuracy": round(float((predictions == labels).double().mean()), 6),
               "images": int(images.shape[0])}
        if "op_bytes" in result:
            row["op_bytes"] = {op: int(round(v)) for op, v in result["op_bytes"].items()}
        if "steady_bytes" in result:  # SPU: one image's run without the silent-OT refills the means amortize
            row["steady_bytes"] = int(round(result["steady_bytes"]))
            row["steady_send_actions"] = int(round(result["steady_send_actions"]))
        rows.append(row)
    return rows


def ratios(rows: list[dict], mode: str = "public", runtime: Optional[str] = None) -> Optional[dict]:
    """bytes(model) / bytes(baseline) next to relu_count(model) / relu_count(baseline), for one mode (and runtime,
    when given; rows without a runtime are CrypTen's)."""
    by_role = {row["role"]: row for row in rows
               if row["mode"] == mode and (runtime is None or row.get("runtime", "crypten") == runtime)}
    model, baseline = by_role.get("model"), by_role.get("baseline")
    if model is None or baseline is None or not baseline["bytes"] or not baseline["relu_count"]:
        return None
    return {"mode": mode, "bytes_ratio": model["bytes"] / baseline["bytes"],
            "relu_ratio": model["relu_count"] / baseline["relu_count"]}


def _seconds(value) -> str:
    return "—" if value is None else f"{value:.3f}"


def table(rows: list[dict]) -> str:
    """The rows as a markdown table, with the notes a reader needs to read the bytes right."""
    def number(value) -> str:
        return "—" if value is None else f"{value:,}"

    lines = ["| runtime | protocol | dealer | model | mode | ReLUs | online bytes/image | setup bytes | "
             "send actions/image | rounds/image | s/image | CPU s/image | agreement | accuracy |",
             "| --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    runtimes = list(dict.fromkeys(row.get("runtime", "crypten") for row in rows))
    for row in rows:
        described = RUNTIMES[row.get("runtime", "crypten")]
        lines.append(f"| {row.get('runtime', 'crypten')} | {row.get('protocol', described['protocol'])} | "
                     f"{'yes' if row.get('dealer', described['dealer']) else 'no'} | {row['model']} | {row['mode']} | "
                     f"{row['relu_count']:,} | {row['bytes']:,} | {number(row.get('setup_bytes'))} | "
                     f"{number(row.get('send_actions'))} | {number(row.get('rounds'))} | "
                     f"{row['seconds_per_image']:.3f} | {_seconds(row.get('cpu_seconds_per_image'))} | "
                     f"{100 * row['agreement']:.1f}% | {100 * row['accuracy']:.1f}% |")
    lines.append("")
    for mode in dict.fromkeys(row["mode"] for row in rows):
        lines.append(f"- {mode}: {MODE_NOTE[mode]}.")
        for runtime in runtimes:
            ratio = ratios(rows, mode, runtime)
            if ratio:
                lines.append(f"  {runtime}: online bytes model/baseline {ratio['bytes_ratio']:.4f}; ReLU count "
                             f"model/baseline {ratio['relu_ratio']:.4f}.")
    lines.append("- s/image: the slower party's wall time; CPU s/image: both parties' own compute (CrypTen), which "
                 "other work on the machine does not stretch.")
    lines.append(f"- agreement: decrypted predictions equal to plaintext PyTorch's, over {rows[0]['images']} test "
                 "images; accuracy: against the labels.")
    for runtime in runtimes:
        lines.append(f"- {runtime}: {RUNTIMES[runtime]['note']}")
    return "\n".join(lines) + "\n"


def merge_rows(previous: list[dict], rows: list[dict]) -> list[dict]:
    """previous rows of other runtimes, then rows: a runtime's new measurement replaces its old one only. Previous
    rows are kept only when they measured the same models (else they are another comparison and are dropped)."""
    measured = {row.get("runtime", "crypten") for row in rows}
    models = {row["model"] for row in rows}
    if {row.get("model") for row in previous} != models:
        return list(rows)
    return [row for row in previous if row.get("runtime", "crypten") not in measured] + list(rows)


def write_results(rows: list[dict], folder: Path) -> list[dict]:
    """pi.json (the list of rows) and pi.md (the table) in folder, each written atomically. Rows of other runtimes
    already in folder/pi.json stay (so CrypTen's and SPU's measurements of a model sit side by side); returns the
    rows written."""
    path = Path(folder) / "pi.json"
    if path.is_file():
        try:
            previous = json.loads(path.read_text())
        except ValueError:
            previous = []
        rows = merge_rows(previous if isinstance(previous, list) else [], rows)
    for name, text in (("pi.json", json.dumps(rows, indent=2) + "\n"), ("pi.md", table(rows))):
        atomic_write_text(Path(folder) / name, text)
    return rows
