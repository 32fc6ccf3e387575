"""Two-party CrypTen inference of exported ONNX models on this machine: two processes over localhost (gloo).

Party 0 is the server (it holds the model and, in CrypTen's default TFP setting, deals the multiplication triples);
party 1 is the client (it holds the images and alone receives the logits). Each job imports one .onnx file with
crypten.nn.from_onnx and runs it in one of two modes:
- "public": weights known to both parties, so convolutions and the classifier are local; what is paid is the ReLUs
  (and any polynomial products).
- "secret": weights secret-shared by party 0 too, so every linear layer also costs multiplications.
Images go through one at a time, so bytes and rounds are those of one private inference. Both parties load the same
.onnx file, since CrypTen builds the graph on each side; in "secret" mode only the server's weight values are used.

Each party counts the bytes it sends and receives; the bytes of the whole run are the sum over both parties / 2.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import torch

from ..errors import FastmaskError
from .crypten_compat import import_crypten, party_environment, plain_settings
from .parties import check_jobs, supervise

MODES = ("public", "secret")
WORLD_SIZE = 2
SERVER, CLIENT = 0, 1


def run_two_party(jobs: Sequence[dict], images: torch.Tensor, timeout: float = 3600.0) -> list[dict]:
    """jobs: [{"name", "onnx", "mode"}]; images: normalized float [N, C, H, W] (the client's input).

    Returns one dict per job: name, mode, bytes and rounds per image, seconds_per_image, and logits [N, classes]
    as decrypted by the client. FastmaskError when a party fails or the run exceeds `timeout` seconds."""
    from safetensors.torch import load_file, save_file

    check_jobs(jobs, images, MODES)
    import_crypten()  # fail here, in one line, rather than in both parties
    with tempfile.TemporaryDirectory(prefix="fastmask-pi-") as work:
        work = Path(work)
        save_file({"images": images.detach().float().cpu().contiguous()}, str(work / "client_images.safetensors"))
        plan = {"jobs": [{"name": j["name"], "onnx": str(Path(j["onnx"]).resolve()), "mode": j["mode"]}
                         for j in jobs],
                "image_shape": list(images.shape[1:]), "count": int(images.shape[0])}
        (work / "plan.json").write_text(json.dumps(plan))
        _launch(work, timeout)
        reports = [json.loads((work / f"party{rank}.json").read_text()) for rank in range(WORLD_SIZE)]
        logits = load_file(str(work / "client_logits.safetensors"))
    count = int(images.shape[0])
    results = []
    for index, job in enumerate(jobs):
        per_party = [report[index] for report in reports]
        results.append({"name": job["name"], "mode": job["mode"],
                        "bytes": sum(p["bytes"] for p in per_party) / 2 / count,
                        "rounds": max(p["rounds"] for p in per_party) / count,
                        "seconds_per_image": max(p["seconds"] for p in per_party) / count,
                        # the parties' own compute (both summed): unlike the wall time, not stretched by other
                        # work on a shared machine
                        "cpu_seconds_per_image": sum(p["cpu_seconds"] for p in per_party) / count,
                        "logits": logits[f"job{index}"]})
    return results


def _launch(work: Path, timeout: float) -> None:
    rendezvous = f"file://{work / 'rendezvous'}"
    package_root = str(Path(__file__).resolve().parents[2])
    processes, logs = [], []
    for rank in range(WORLD_SIZE):
        env = party_environment(rank, WORLD_SIZE, rendezvous)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        log = open(work / f"party{rank}.log", "w+")
        logs.append(log)
        processes.append(subprocess.Popen([sys.executable, "-m", "fastmask.pi.two_party", "--rank", str(rank),
                                           "--work", str(work)], env=env, stdout=log, stderr=subprocess.STDOUT))
    failed = supervise(processes, logs, timeout, "the two-party run")
    if failed:
        tail = (work / f"party{failed[0]}.log").read_text().strip().splitlines()[-1:] or ["no output"]
        raise FastmaskError(f"CrypTen party {failed[0]} failed (exit {processes[failed[0]].returncode}): {tail[0]}")


def _public_weights(model) -> None:
    """Lets a CrypTen model take encrypted inputs while its parameters stay plaintext: CrypTen refuses CrypTensor
    inputs to a module whose `encrypted` flag is off, and model.encrypt() would secret-share the weights."""
    for module in model.modules():
        module.encrypted = True


def _party(rank: int, work: Path) -> None:
    """One party's whole run: every job, one image at a time; writes party<rank>.json (and the client's logits)."""
    torch.set_num_threads(1)
    crypten = import_crypten()
    from crypten.config import cfg
    from safetensors.torch import load_file, save_file

    plan = json.loads((work / "plan.json").read_text())
    shape, count = [1, *plan["image_shape"]], plan["count"]
    images = load_file(str(work / "client_images.safetensors"))["images"] if rank == CLIENT else None
    crypten.init()
    cfg.communicator.verbose = True
    plain_settings(cfg)
    comm = crypten.comm.get()
    report, client_logits = [], {}
    for index, job in enumerate(plan["jobs"]):
        with open(job["onnx"], "rb") as f:
            model = crypten.nn.from_onnx(f)
        model.eval()
        if job["mode"] == "secret":
            model.encrypt(src=SERVER)
        else:
            _public_weights(model)
        comm.barrier()
        comm.reset_communication_stats()
        outputs = []
        started, cpu_started = time.perf_counter(), time.process_time()
        with crypten.no_grad():
            for i in range(count):
                x = images[i:i + 1] if rank == CLIENT else torch.zeros(shape)
                logits = model(crypten.cryptensor(x, src=CLIENT)).get_plain_text(dst=CLIENT)
                outputs.append(logits)
        seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
        stats = comm.get_communication_stats()
        report.append({"bytes": int(stats["bytes"]), "rounds": int(stats["rounds"]), "seconds": seconds,
                       "cpu_seconds": cpu_seconds})
        if rank == CLIENT:
            client_logits[f"job{index}"] = torch.cat(outputs).float().contiguous()
    crypten.uninit()
    if rank == CLIENT:
        save_file(client_logits, str(work / "client_logits.safetensors"))
    (work / f"party{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="one party of fastmask.pi.two_party.run_two_party")
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--work", type=Path, required=True)
    arguments = parser.parse_args()
    _party(arguments.rank, arguments.work)
