"""A user's own model through whole runs, as separate processes: a builder in a .py file and a state_dict saved by
plain PyTorch run fastmask-linearize, are killed with SIGKILL once BCD has saved a target, resume to the masks and
weights of the uninterrupted run, and export to an ONNX graph whose Relu elements are the target's ReLU count; the
same run under torchrun with two processes lands on exact targets with the same masks on both, and its sharded
search makes one process's first decision."""
from __future__ import annotations

import csv
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fastmask as fm
from fastmask import cli
from fastmask.checkpoint import load_model, read_spec

BUILDER = textwrap.dedent('''
    import torch
    import torch.nn as nn
    import torch.nn.functional as F


    class Residual(nn.Module):
        """conv-BN-ReLU, then a conv-BN-ReLU block whose output is added back before the last ReLU."""

        def __init__(self, num_classes):
            super().__init__()
            self.stem = nn.Conv2d(3, 4, 3, padding=1, bias=False)
            self.bn0 = nn.BatchNorm2d(4)
            self.conv1 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(4)
            self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(4)
            self.fc = nn.Linear(4, num_classes)

        def forward(self, x):
            x = F.relu(self.bn0(self.stem(x)))
            y = torch.relu(self.bn1(self.conv1(x)))
            x = F.relu(self.bn2(self.conv2(y)) + x)
            return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


    def build(num_classes=10):
        return Residual(num_classes)
''')
RELUS = 3 * 4 * 8 * 8  # three sites of 4 x 8 x 8
TARGETS = (620, 470)
# 768 -> 620 takes 6 steps of at most 25, 620 -> 470 six more: the kill lands after step 6, with steps to go.
SETTINGS = ["--targets", ",".join(map(str, TARGETS)), "--drc", "25", "--rt", "2", "--finetune-epochs", "1",
            "--score-subset", "32", "--adt", "50", "--finetune-target-epochs", "1", "--seed", "3", "--device", "cpu",
            "--quiet"]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    pass


@pytest.fixture
def user_files(tmp_path) -> tuple[Path, Path, Path]:
    """(the builder's file, weights after two plain SGD steps saved as a state_dict, an .npz of 3 classes of 8x8 RGB
    images whose class is their brightness)."""
    generator = np.random.default_rng(0)

    def split(n):
        labels = np.arange(n) % 3
        images = generator.integers(0, 60, size=(n, 8, 8, 3)) + 80 * labels[:, None, None, None]
        return images.astype(np.uint8), labels.astype(np.int64)

    (x_train, y_train), (x_test, y_test) = split(96), split(24)
    npz = tmp_path / "toy.npz"
    np.savez(npz, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    builder = tmp_path / "my_net.py"
    builder.write_text(BUILDER)
    # the user's side: plain PyTorch, no fastmask
    spec = importlib.util.spec_from_file_location("my_net", builder)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(0)
    model = module.build(num_classes=3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    images = torch.from_numpy(x_train).permute(0, 3, 1, 2).float() / 255
    labels = torch.from_numpy(y_train)
    for _ in range(2):
        optimizer.zero_grad()
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()
    weights = tmp_path / "weights.pt"
    torch.save(model.state_dict(), weights)
    return builder, weights, npz


def linearize(out: Path, builder: Path, weights: Path, npz: Path, *extra: str, processes: int = 1
              ) -> subprocess.Popen:
    """`python -m fastmask` (fastmask-linearize) as its own process, one thread; with processes > 1,
    `torchrun --standalone --nproc_per_node N -m fastmask`, as a user starts it."""
    command = [sys.executable, "-m", "fastmask", "--dataset", f"npz:{npz}", "--arch", f"{builder}:build",
               "--checkpoint", str(weights), "--out", str(out), *SETTINGS, *extra]
    if processes > 1:
        command[1:2] = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes), "-m"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(process: subprocess.Popen) -> str:
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output[-4000:]
    return output


def steps_done(out: Path) -> list[dict]:
    """steps.csv's rows: written (atomically) after each step's state, so a row is a step a resume starts after."""
    path = out / "steps.csv"
    if not path.is_file():
        return []
    with path.open() as f:
        return list(csv.DictReader(f))


def target_state(out: Path, budget: int) -> dict[str, torch.Tensor]:
    model = load_model(out / "targets" / str(budget) / "model.safetensors")
    assert fm.relu_count(model) == budget  # exact
    return model.state_dict()


def test_a_user_model_killed_during_bcd_resumes_to_the_uninterrupted_run_and_exports(user_files, tmp_path):
    builder, weights, npz = user_files
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    full = linearize(reference, builder, weights, npz)

    run = linearize(killed, builder, weights, npz)
    deadline = time.monotonic() + 300
    while not any(int(row["budget_after"]) == TARGETS[0] for row in steps_done(killed)):
        assert run.poll() is None, run.communicate()[0][-3000:]  # still going: the kill must interrupt it
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(run.pid, signal.SIGKILL)
    run.communicate(timeout=60)
    assert run.returncode == -signal.SIGKILL
    finish(full)
    stopped_after = len(steps_done(killed))
    assert stopped_after < len(steps_done(reference))  # killed before the end, not after it
    assert not (killed / "summary.json").exists()

    output = finish(linearize(killed, builder, weights, npz, "--resume"))
    resumed = re.search(r"resuming after step (\d+)", output)
    assert resumed, output[-3000:]
    # a step writes its state, then its steps.csv row: a kill between the two resumes one step after the table's last
    assert int(resumed.group(1)) in (stopped_after, stopped_after + 1)
    assert [row["budget_after"] for row in steps_done(killed)] == [row["budget_after"]
                                                                   for row in steps_done(reference)]
    for budget in TARGETS:
        ours, theirs = target_state(killed, budget), target_state(reference, budget)
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), budget  # masks and weights, bit for bit

    onnxruntime = pytest.importorskip("onnxruntime")
    import onnx

    from fastmask.pi.export import relu_elements

    smallest = killed / "targets" / str(TARGETS[-1]) / "model.safetensors"
    assert cli.export_main([str(smallest), "--no-check"]) == 0
    proto = onnx.load(str(smallest.with_suffix(".onnx")))
    assert relu_elements(proto) == read_spec(smallest)[1]["relu_count"] == TARGETS[-1] < RELUS
    model = load_model(smallest).eval()
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    session = onnxruntime.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    with torch.no_grad():
        expected = model(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built")
def test_torchrun_runs_a_user_model_to_exact_targets_with_one_process_s_first_decision(user_files, tmp_path):
    from fastmask import distributed

    builder, weights, npz = user_files
    two, one = tmp_path / "two", tmp_path / "one"
    together = linearize(two, builder, weights, npz, processes=2)
    alone = linearize(one, builder, weights, npz)
    output, _ = finish(together), finish(alone)
    summary = json.loads((two / "summary.json").read_text())
    assert summary["processes"]["count"] == 2 and summary["processes"]["backend"] == "gloo"
    assert output.count("2 processes (gloo)") == 1 and "(rank 1)" not in output  # rank 0 alone logs
    digests = {}
    for budget in TARGETS:
        model = load_model(two / "targets" / str(budget) / "model.safetensors")
        assert fm.relu_count(model) == budget  # exact
        digests[budget] = distributed.masks_digest(model)
    # every step checked both processes' masks; the last word, in the summary, is the last target's
    assert summary["processes"]["masks_sha256"] == digests[TARGETS[-1]]
    # the same steps as one process, and the same first choice, scored on the same subset from the same weights
    # (later steps differ: BatchNorm normalizes each process's half of a finetune batch)
    ours, theirs = steps_done(two), steps_done(one)
    assert [row["budget_after"] for row in ours] == [row["budget_after"] for row in theirs]
    for key in ("ref_acc", "ref_loss", "accepted_index", "accepted_acc", "accepted_loss", "tries_scored"):
        assert ours[0][key] == theirs[0][key], key
    for run in (two, one):
        assert [t["budget"] for t in json.loads((run / "summary.json").read_text())["targets"]] == list(TARGETS)
