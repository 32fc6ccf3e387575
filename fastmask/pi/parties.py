"""Watching the two party processes of a two-party run (CrypTen's or SPU's): both are polled, so that when one dies
the other, which would wait on it forever, is stopped at once."""
from __future__ import annotations

import subprocess
import time
from typing import IO, Sequence

from ..errors import FastmaskError


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
