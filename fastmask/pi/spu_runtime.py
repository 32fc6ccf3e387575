"""Two-party SecretFlow SPU inference of exported ONNX models on this machine: two processes over localhost.

SPU runs in its own environment (fastmask.pi.spu_env); this side, in fastmask's environment, writes the images and a
plan as files, starts the two parties (fastmask/pi/spu_party.py, with the SPU environment's python), and reads back
their reports and the client's logits. Party 0 is the server (it holds the model), party 1 the client (it holds the
images and alone gets the logits). Protocols (SPU 0.9.5, ring FM64, 18 fraction bits):
- "cheetah": Cheetah, two parties and no dealer: silent OT (Ferret) for the non-linear layers and truncations, HE
  only for secret x secret products.
- "semi2k": SPU's SEMI2K with trusted-first-party Beaver triples: party 0 deals them, like CrypTen's default.
Weight modes as with CrypTen: "public" (weights are constants of the SPU program, known to both parties) and
"secret" (weights shared by the server once per job; secret x secret convolutions).

What run_spu returns per job, per image where it says so (every byte is a payload byte sent over the link, summed over
both parties; SPU counts its own traffic, see spu_party's docstring):
- bytes: online bytes per image: the mean over the images of (SPU's link bytes of the run + the client's input share
  + the server's share of the logits).
- warmup_bytes: the same for the first run of the job, on an all-zero image, in a fresh SPU runtime.
- weight_bytes: the secret weight shares the server sent (0 in public mode), once per job.
- setup_bytes: the one-time cost apart from the online bytes: warmup_bytes - bytes + weight_bytes. With Cheetah the
  difference is the setup the first run pays (base OTs and the first Ferret extension; in secret mode also the HE
  keys); SPU gives no counter of its own for it, so it is measured as this difference.
- send_actions: send calls per image, both parties, the two share messages included; SPU's counters give no rounds,
  so rounds is None.
- steady_bytes, steady_send_actions: the median over the images: one image's run without the extra traffic Cheetah
  sends now and then (its silent-OT pool refilled: about 0.3 MB and 1,300 send actions for a run of ReLUs, more
  often and about 1.1 MB each where secret products use many OTs). Every image of a job runs the same program on the
  same shapes, so the steady run is the same for all; bytes and send_actions (means) carry the refills, amortized
  over the images run, and so depend on how many were run. bytes_by_image and send_actions_by_image list them.
- op_bytes: the online bytes per image split by the SPU op that sent them, from the per-op lines SPU prints with
  each run. pphlo.less and the pphlo.multiply of the select are the ReLUs, about 100 bytes per element with Cheetah
  (pphlo.multiply also holds the graph's own Mul nodes: a BN affine, a polynomial); pphlo.convolution and pphlo.dot
  with public weights are the truncations of their outputs, one message per op of 3 bytes per output element;
  "input and output shares" are the two share messages. They sum to bytes.
- seconds_per_image: the mean over the images of the slower party's wall time for one image (shares in, run, out).
- logits: [N, classes] float32 tensor as reconstructed by the client.
"""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..errors import FastmaskError
from . import spu_env
from .parties import check_jobs, supervise

MODES = ("public", "secret")
PROTOCOLS = ("cheetah", "semi2k")
WORLD_SIZE = 2
SERVER, CLIENT = 0, 1
LINK_LINE = re.compile(r"Link details: total send bytes (\d+), recv bytes (\d+), send actions (\d+)")
OP_LINE = re.compile(r"- (\S+(?:: \S+)?), executed \d+ times, duration \S+, send bytes (\d+) recv bytes \d+, "
                     r"send actions (\d+)")


def _free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def link_counters(log_text: str) -> list[tuple[int, int, dict]]:
    """(send bytes, send actions, {op: send bytes}) of every SPU run in a party's log, in order. SPU prints a line
    per op kind (pphlo.less, pphlo.convolution, ...) before each run's "Link details" line."""
    runs, ops = [], {}
    for line in log_text.splitlines():
        link = LINK_LINE.search(line)
        if link:
            runs.append((int(link.group(1)), int(link.group(3)), ops))
            ops = {}
            continue
        op = OP_LINE.search(line)
        if op and int(op.group(2)):
            ops[op.group(1)] = ops.get(op.group(1), 0) + int(op.group(2))
    return runs


def run_spu(jobs: Sequence[dict], images: torch.Tensor, protocol: str = "cheetah",
            timeout: float = 3600.0) -> list[dict]:
    """jobs: [{"name", "onnx", "mode"}]; images: normalized float [N, C, H, W] (the client's input).

    Returns one dict per job (see the module docstring for what each field counts): name, mode, bytes,
    warmup_bytes, weight_bytes, setup_bytes, send_actions, rounds (None), op_bytes, seconds_per_image, logits.
    FastmaskError when the SPU environment is missing, a party fails or the run exceeds `timeout` seconds."""
    if protocol not in PROTOCOLS:
        raise FastmaskError(f"SPU protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    check_jobs(jobs, images, MODES)
    python = spu_env.require()  # one line naming the install command when it is missing
    count = int(images.shape[0])
    with tempfile.TemporaryDirectory(prefix="fastmask-spu-") as work:
        work = Path(work)
        np.save(work / "client_images.npy", images.detach().float().cpu().numpy())
        plan = {"jobs": [{"name": j["name"], "onnx": str(Path(j["onnx"]).resolve()), "mode": j["mode"]}
                         for j in jobs],
                "protocol": protocol, "image_shape": list(images.shape[1:]), "count": count,
                "ports": _free_ports(WORLD_SIZE), "timeout": float(timeout)}
        (work / "plan.json").write_text(json.dumps(plan))
        _launch(python, work, timeout)
        reports = [json.loads((work / f"party{rank}.json").read_text()) for rank in range(WORLD_SIZE)]
        counters = [link_counters((work / f"party{rank}.log").read_text()) for rank in range(WORLD_SIZE)]
        logits = [torch.from_numpy(np.load(work / f"logits{i}.npy")).float() for i in range(len(jobs))]
    runs_per_job = 1 + count
    for rank, found in enumerate(counters):
        if len(found) != len(jobs) * runs_per_job:
            raise FastmaskError(f"SPU party {rank} logged {len(found)} runs' link counters, expected "
                                f"{len(jobs) * runs_per_job}; is RuntimeConfig.enable_pphlo_profile still honoured?")
    results = []
    for index, job in enumerate(jobs):
        run_bytes, run_actions, run_seconds, op_bytes = [], [], [], {}
        for step in range(runs_per_job):
            at = index * runs_per_job + step
            parties = [(counters[r][at], reports[r][index]["runs"][step]) for r in range(WORLD_SIZE)]
            run_bytes.append(sum(c[0] + p["io_bytes"] for c, p in parties))
            run_actions.append(sum(c[1] + p["io_actions"] for c, p in parties))
            run_seconds.append(max(p["seconds"] for _, p in parties))
            if step > 0:
                for c, p in parties:
                    for op, sent in [*c[2].items(), ("input and output shares", p["io_bytes"])]:
                        op_bytes[op] = op_bytes.get(op, 0) + sent / count
        online = float(np.mean(run_bytes[1:]))
        weight_bytes = sum(reports[r][index]["weight_bytes"] for r in range(WORLD_SIZE))
        results.append({"name": job["name"], "mode": job["mode"], "bytes": online,
                        "warmup_bytes": run_bytes[0], "weight_bytes": weight_bytes,
                        "setup_bytes": run_bytes[0] - online + weight_bytes,
                        "send_actions": float(np.mean(run_actions[1:])), "rounds": None,
                        "steady_bytes": float(np.median(run_bytes[1:])),
                        "steady_send_actions": float(np.median(run_actions[1:])),
                        "bytes_by_image": run_bytes[1:], "send_actions_by_image": run_actions[1:],
                        "op_bytes": {op: op_bytes[op] for op in sorted(op_bytes, key=op_bytes.get, reverse=True)},
                        "seconds_per_image": float(np.mean(run_seconds[1:])), "logits": logits[index]})
    return results


def _party_environment() -> dict:
    """The SPU parties must see nothing of fastmask's environment: no PYTHONPATH, no user site; one thread each."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update({"PYTHONNOUSERSITE": "1", "OMP_NUM_THREADS": "1", "JAX_PLATFORMS": "cpu",
                "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"})
    return env


def _launch(python: Path, work: Path, timeout: float) -> None:
    processes, logs = [], []
    env = _party_environment()
    for rank in range(WORLD_SIZE):
        log = open(work / f"party{rank}.log", "w+")
        logs.append(log)
        processes.append(subprocess.Popen([str(python), str(spu_env.PARTY_SCRIPT), "party", "--rank", str(rank),
                                           "--work", str(work)], env=env, stdout=log, stderr=subprocess.STDOUT,
                                          cwd=str(work)))
    failed = supervise(processes, logs, timeout, "the SPU two-party run")
    if failed:
        lines = (work / f"party{failed[0]}.log").read_text().strip().splitlines()
        errors = [line for line in lines if "error" in line.lower()] or lines or ["no output"]
        raise FastmaskError(f"SPU party {failed[0]} failed (exit {processes[failed[0]].returncode}): "
                            f"{errors[-1].strip()}")
