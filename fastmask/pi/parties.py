"""Watching the two party processes of a two-party run (CrypTen's or SPU's): both are polled, so that when one dies
the other, which would wait on it forever, is stopped at once."""
from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import IO, Sequence

import torch

from ..errors import FastmaskError


def check_jobs(jobs: Sequence[dict], images: torch.Tensor, modes: Sequence[str]) -> None:
    """One line for what would make both parties fail: no images, an unknown mode, a missing ONNX file."""
    if images.dim() != 4 or images.shape[0] == 0:
        raise FastmaskError(f"images must be a non-empty [N, C, H, W] batch, got shape {tuple(images.shape)}")
    for job in jobs:
        if job["mode"] not in modes:
            raise FastmaskError(f"mode must be one of {', '.join(modes)}, got {job['mode']!r}")
        if not Path(job["onnx"]).is_file():
            raise FastmaskError(f"ONNX file {job['onnx']} does not exist")


def supervise(processes: Sequence[subprocess.Popen], logs: Sequence[IO], timeout: float, what: str) -> list[int]:
    """Waits for every party; kills the rest when one fails or `timeout` seconds pass (FastmaskError naming `what`,
    e.g. "the SPU two-party run"); closes the logs. Returns the ranks that exited non-zero."""
    deadline = time.monotonic() + timeout
    try:
        while any(p.poll() is None for p in processes):
            if any(p.returncode not in (None, 0) for p in processes):
                break
            if time.monotonic() > deadline:
                raise FastmaskError(f"{what} took longer than {timeout:.0f}s; use fewer --images")
            time.sleep(0.05)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
        for log in logs:
            log.close()
    return [rank for rank, process in enumerate(processes) if process.returncode != 0]
