"""Several processes under torchrun: one process group, and the few collectives the pipeline needs.

`torchrun --nproc_per_node N $(which fastmask-linearize) ...` starts N copies of the command with RANK, WORLD_SIZE,
LOCAL_RANK and a rendezvous address in their environment; `from_environment` turns that into a `Group` (nccl on
CUDA, each process on GPU LOCAL_RANK; gloo on the CPU). Without torchrun it returns None and every caller runs as
one process. What each part does with a group:

- training (fastmask.train): every process takes its share of each global batch (the same shuffle and augmentation
  everywhere), DDP averages the gradients, so the effective batch and learning rate are one process's;
- scoring (fastmask.search.scoring and racing): chunks of candidates are dealt to the processes and gathered;
- BCD (fastmask.search.bcd): rank 0's decision is broadcast and the masks are checked identical after every step;
- files, logs and progress bars: rank 0 only.
"""
from __future__ import annotations

import datetime
import hashlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NoReturn, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from .errors import FastmaskError

# A collective that waits longer than this for a peer ends the run with an error instead of hanging (torchrun also
# ends every process as soon as one dies). Long enough for the slowest thing one rank does alone: writing a report.
TIMEOUT = datetime.timedelta(minutes=10)
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
_joined_launched_group = False  # set once from_environment has started this process's group


@dataclass
class Group:
    """This process's place in the group, and the collectives the pipeline uses (all of them blocking)."""

    rank: int
    size: int
    backend: str
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_gather(self, value: Any) -> list[Any]:
        """Every process's `value` (any picklable object), in rank order, on every process."""
        gathered: list[Any] = [None] * self.size
        dist.all_gather_object(gathered, value)
        return gathered

    def broadcast(self, value: Any, source: int = 0) -> Any:
        """`source`'s value, on every process."""
        box = [value]
        dist.broadcast_object_list(box, src=source)
        return box[0]

    def all_reduce_sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def broadcast_state_(self, module: nn.Module, source: int = 0) -> None:
        """Every parameter and buffer of `module` set to `source`'s, in place (e.g. BatchNorm statistics, which each
        process updates from its own share of the batch)."""
        with torch.no_grad():
            for tensor in [*module.parameters(), *module.buffers()]:
                dist.broadcast(tensor.data, src=source)

    def barrier(self) -> None:
        dist.barrier()

    def check_same(self, what: str, digest: str) -> None:
        """Raises FastmaskError on every process when the processes' digests of `what` differ."""
        digests = self.all_gather(digest)
        if len(set(digests)) > 1:
            differing = [r for r, d in enumerate(digests) if d != digests[0]]
            raise FastmaskError(f"the {what} differ between processes: rank(s) {differing} disagree with rank 0 "
                                f"({len(set(digests))} different versions); the run stops here, the state on disk is "
                                "the last step all processes agreed on")


def launched() -> bool:
    """Whether this process was started by torchrun (or anything else that sets WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def from_environment(device: Optional[str]) -> Optional[Group]:
    """The group torchrun's environment describes (initialised once per process), or None when run alone.

    `device` is the run's --device: CUDA gives nccl and one GPU per process (cuda:LOCAL_RANK), anything else gloo."""
    if not launched():
        return None
    missing = [name for name in LAUNCH_VARIABLES if name not in os.environ]
    if missing:
        raise FastmaskError(f"WORLD_SIZE is {os.environ['WORLD_SIZE']} but {', '.join(missing)} is not set: start "
                            "several processes with torchrun --nproc_per_node N")
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    on_cuda = device is not None and str(device).startswith("cuda")
    backend = "nccl" if on_cuda else "gloo"
    if on_cuda:
        if local_rank >= torch.cuda.device_count():
            raise FastmaskError(f"local rank {local_rank} has no GPU: this machine has {torch.cuda.device_count()}; "
                                "start at most that many processes per node")
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=TIMEOUT,
                                device_id=torch.device("cuda", local_rank) if on_cuda else None)
        global _joined_launched_group
        _joined_launched_group = True
    return Group(rank=rank, size=size, backend=backend, local_rank=local_rank)


def device_for(group: Optional[Group], device: str) -> str:
    """The device this process works on: CUDA runs put each process on its own GPU."""
    if group is not None and str(device).startswith("cuda"):
        return f"cuda:{group.local_rank}"
    return device


def close() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def leave(code: int) -> NoReturn:
    """Ends this process now with `code`, without the interpreter's shutdown; call it with every file written and
    the group closed. gloo's worker threads may still be dropping the last collectives' tensors, which takes the GIL,
    and an interpreter shutting down under them aborts the process now and then (SIGABRT, "terminate called without
    an active exception"), which torchrun reports as a failed run."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def leave_if_launched(code: int) -> None:
    """`leave(code)` in a process that joined torchrun's group through `from_environment`; otherwise returns."""
    if _joined_launched_group:
        close()
        leave(code)


def masks_digest(model: nn.Module) -> str:
    """SHA-256 of every site's mask, in site order: equal on two processes exactly when their masks are."""
    from .masks import MaskSet

    digest = hashlib.sha256()
    for site in MaskSet(model).sites:
        digest.update(site.mask.detach().to("cpu", torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def is_main(group: Optional[Group]) -> bool:
    return group is None or group.is_main


def share(count: int, group: Optional[Group]) -> slice:
    """This process's contiguous share of `count` items (the first ranks get one more when it does not divide)."""
    if group is None:
        return slice(0, count)
    base, extra = divmod(count, group.size)
    start = group.rank * base + min(group.rank, extra)
    return slice(start, start + base + (group.rank < extra))


# ---- a group of local processes without torchrun (tests, benches, notebooks) --------------------------------------
def run_local(fn: Callable[..., Any], size: int, *args: Any, threads: int = 1, backend: str = "gloo") -> list[Any]:
    """fn(group, *args) in `size` new processes on this machine, joined over a file rendezvous (gloo on the CPU;
    nccl: process r on GPU r), each with `threads` torch threads; returns their results in rank order (results go
    through torch.save: tensors, numbers, strings and containers of them). `fn` must be a module-level function."""
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(_local_process, args=(size, folder, fn, args, threads, backend), nprocs=size, join=True)
        return [torch.load(Path(folder) / f"rank{rank}.pt", weights_only=True) for rank in range(size)]


def _local_process(rank: int, size: int, folder: str, fn: Callable[..., Any], args: tuple, threads: int,
                   backend: str) -> None:
    torch.set_num_threads(threads)
    device_id = None
    if backend == "nccl":
        torch.cuda.set_device(rank)
        device_id = torch.device("cuda", rank)
    dist.init_process_group(backend, init_method=f"file://{Path(folder) / 'rendezvous'}", rank=rank,
                            world_size=size, timeout=TIMEOUT, device_id=device_id)
    try:
        result = fn(Group(rank=rank, size=size, backend=backend, local_rank=rank), *args)
        torch.save(result, Path(folder) / f"rank{rank}.pt")
        # no process tears the group down while another still talks to it (gloo aborts the process otherwise); a
        # process that raised does not get here, and spawn ends the others
        dist.barrier()
    finally:
        dist.destroy_process_group()
    leave(0)  # the result is on disk
