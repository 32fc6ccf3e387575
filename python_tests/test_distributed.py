"""Two processes (gloo, CPU): sharded scoring and racing equal one process's, data-parallel training keeps the
batch and learning rate, mismatched masks stop the run; torchrun runs of the offline default, killed and resumed.

The group tests start their processes with fastmask.distributed.run_local (a file rendezvous, one thread each); the
torchrun tests run the installed console script the way a user does.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from helpers import randomize_batchnorm

import fastmask as fm
from fastmask import data, distributed, train
from fastmask.errors import FastmaskError
from fastmask.masks import MaskSet
from fastmask.search.bcd import STATE_FILE, load_state
from fastmask.search.polynomial import make_polynomial
from fastmask.search.racing import race
from fastmask.search.scoring import score_current, score_hypotheses

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built")


def tiny_case(seed: int = 0):
    torch.manual_seed(seed)
    model = randomize_batchnorm(fm.models.create("resnet18", 10, 8, width=2, in_channels=1), seed, 4.0).eval()
    masks = MaskSet(model)
    generator = torch.Generator().manual_seed(seed)
    masks.remove(masks.sample(masks.total() // 2, generator))
    candidates = [masks.sample(40, generator) for _ in range(7)]  # odd: the last wave is uneven
    images = torch.randn(96, 1, 8, 8, generator=generator)
    labels = torch.randint(0, 10, (96,), generator=generator)
    return model, candidates, images, labels


def scores_as_dict(scores) -> dict:
    return {"accuracy": scores.accuracy, "loss": scores.loss, "correct": scores.correct, "scored": scores.scored,
            "accepted": -1 if scores.accepted is None else scores.accepted}


def scoring_worker(group, chunk_size: int) -> dict:
    """Every result computed twice in each process: shared out over the group, and alone."""
    model, candidates, images, labels = tiny_case()
    reference = score_current(model, images, labels)
    out = {}
    alone = score_hypotheses(model, candidates, images, labels, chunk_size=chunk_size)
    drops = alone.drop(reference)
    adt = float(drops.min()) + 1e-9  # the stop rule fires at the first candidate with the smallest drop
    for name, options in {"plain": {}, "stop": {"reference": reference, "adt": adt}}.items():
        out[f"{name}/sharded"] = scores_as_dict(score_hypotheses(model, candidates, images, labels,
                                                                 chunk_size=chunk_size, group=group, **options))
        out[f"{name}/alone"] = scores_as_dict(score_hypotheses(model, candidates, images, labels,
                                                               chunk_size=chunk_size, **options))
    for name, g in (("race/sharded", group), ("race/alone", None)):
        result = race(model, candidates, images, labels, reference=reference, adt=adt, first_slice=24,
                      chunk_size=chunk_size, group=g)
        out[name] = {"order": result.order, "best": result.best, "accuracy": result.accuracy, "loss": result.loss,
                     "forward_images": result.forward_images}
    out["masks"] = distributed.masks_digest(model)
    return out


@pytest.mark.parametrize("chunk_size", [1, 2])
def test_sharded_scoring_and_racing_equal_one_process(chunk_size):
    results = distributed.run_local(scoring_worker, 2, chunk_size)
    for rank_result in results:
        for name in ("plain", "stop"):
            sharded, alone = rank_result[f"{name}/sharded"], rank_result[f"{name}/alone"]
            assert sharded["scored"] == alone["scored"] and sharded["accepted"] == alone["accepted"]
            for key in ("accuracy", "loss", "correct"):  # bit for bit
                assert torch.equal(sharded[key][:alone["scored"]], alone[key][:alone["scored"]]), (name, key)
        assert rank_result["stop/alone"]["accepted"] >= 0
        assert rank_result["race/sharded"] == rank_result["race/alone"]
    assert _equal(results[0], results[1])  # every process returns the same


def _equal(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, torch.Tensor):
        return torch.equal(a.nan_to_num(-7.0), b.nan_to_num(-7.0))
    return a == b


def mismatch_worker(group) -> str:
    model = tiny_case()[0]
    if group.rank == 1:  # one process drifts
        MaskSet(model).remove(MaskSet(model).sample(1, torch.Generator().manual_seed(5)))
    try:
        group.check_same("masks after BCD step 3", distributed.masks_digest(model))
    except FastmaskError as err:
        return str(err)
    return "no error"


def test_masks_that_differ_between_processes_stop_every_process():
    messages = distributed.run_local(mismatch_worker, 2)
    for message in messages:
        assert "masks after BCD step 3 differ between processes" in message and "rank(s) [1]" in message


def informed_worker(group, out: str) -> dict:
    """BCD over estimates summed from the processes' shares of the scoring subset; the driver checks the masks'
    digests after every step."""
    from fastmask.config import BCDConfig
    from fastmask.search.bcd import BCD

    model, _, images, labels = tiny_case()
    count = MaskSet(model).count()
    config = BCDConfig(targets=[count - 120, count - 240], drc=60, rt=2, adt=100.0)
    driver = BCD(model, config, images, labels, lambda m, step: {"val_acc": 50.0}, out, group=group,
                 log=lambda message: None)
    result = driver.run()
    return {"steps": len(result.history), "masks": distributed.masks_digest(model), "count": MaskSet(model).count(),
            "start": count}


def test_informed_steps_are_the_same_on_every_process(tmp_path):
    first, second = distributed.run_local(informed_worker, 2, str(tmp_path))
    assert first == second and first["count"] == first["start"] - 240 and first["steps"] == 4


def digits():
    return data.load_dataset("digits", seed=0)


def linear_training_worker(group, use_group: bool) -> dict:
    """A BatchNorm-free model: data-parallel SGD must give one process's weights (same batch, same lr)."""
    dataset = digits()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(dataset.image_size ** 2, 10))
    config = train.TrainConfig(epochs=2, optimizer="sgd", lr=0.1, seed=3, batch_size=128)
    rows = train.train(model, dataset, config, "cpu", progress=False, group=group if use_group else None)
    return {"weight": model[1].weight.detach().clone(), "images": rows[-1]["images"],
            "train_loss": rows[-1]["train_loss"], "val_acc": rows[-1]["val_acc"]}


def resnet_training_worker(group, polynomial: bool) -> dict:
    dataset = digits()
    torch.manual_seed(0)
    model = fm.models.create("resnet18", 10, dataset.image_size, width=2, in_channels=1)
    if polynomial:  # half the ReLUs removed; the sites with none removed leave their coefficients unused
        make_polynomial(model)
        masks = MaskSet(model)
        masks.remove(masks.sample(masks.total() // 2, torch.Generator().manual_seed(0)))
        masks.sites[0].mask.fill_(1)
    config = train.TrainConfig(epochs=1, optimizer="sgd", lr=0.05, seed=1)
    rows = train.train(model, dataset, config, "cpu", progress=False, group=group, max_steps=4)
    digest = [v.detach().clone() for v in model.state_dict().values()]
    return {"state": digest, "images": rows[-1]["images"]}


def test_data_parallel_training_keeps_the_batch_and_learning_rate():
    # 1,293 train images: the last batch of 13 splits 7 / 6, so the loss weighting is exercised too
    together = distributed.run_local(linear_training_worker, 2, True)
    alone = distributed.run_local(linear_training_worker, 1, False)[0]
    for result in together:
        assert result["images"] == alone["images"] == 2 * 1293
        torch.testing.assert_close(result["weight"], alone["weight"], rtol=0, atol=1e-5)
        assert result["train_loss"] == pytest.approx(alone["train_loss"], rel=1e-5)
    assert torch.equal(together[0]["weight"], together[1]["weight"])


@pytest.mark.parametrize("polynomial", [False, True])
def test_data_parallel_resnet_ends_identical_on_every_process(polynomial):
    first, second = distributed.run_local(resnet_training_worker, 2, polynomial)
    assert first["images"] == second["images"] == 4 * 128
    assert all(torch.equal(a, b) for a, b in zip(first["state"], second["state"]))


# ---- torchrun, as a user runs it ------------------------------------------------------------------------------
# The offline default, as `python -m fastmask` runs it with no settings (the demo preset on digits).
DEFAULT = ["--quiet"]


def torchrun(processes: int, out: Path, *extra: str, env: dict | None = None) -> subprocess.Popen:
    """`torchrun --standalone --nproc_per_node N -m fastmask ...` (N = 1: plain `python -m fastmask`)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    command = [sys.executable, "-m", "fastmask", "--out", str(out), *DEFAULT, *extra]
    if processes > 1:
        command[1:2] = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes), "-m"]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(process: subprocess.Popen, timeout: float = 600) -> str:
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output[-4000:]
    return output


def target_masks(out: Path) -> dict[int, bytes]:
    summary = json.loads((out / "summary.json").read_text())
    masks = {}
    for target in summary["targets"]:
        folder = out / "targets" / str(target["budget"])
        model = fm.checkpoint.load_model(folder / "model.safetensors")
        assert fm.relu_count(model) == target["budget"]  # exact
        masks[target["budget"]] = distributed.masks_digest(model)
    return masks


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("torchrun") / "run"
    output = finish(torchrun(2, out))
    return out, output


def test_two_processes_run_the_offline_default_to_exact_identical_masks(two_process_run):
    out, output = two_process_run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["processes"]["count"] == 2 and summary["processes"]["backend"] == "gloo"
    masks = target_masks(out)
    assert sorted(masks) == [1200, 2000]
    # every step checked the masks' digests on both processes; the final one is in the summary
    assert summary["processes"]["masks_sha256"] == masks[1200]
    assert output.count("2 processes (gloo)") == 1  # rank 0 alone logs
    assert "(rank 1)" not in output


def test_every_process_of_a_finished_run_exits_cleanly(tmp_path, two_process_run):
    # resuming a finished run only rewrites the report, so the processes reach their end within a second of each
    # other: the moment at which an interpreter shutting down under gloo's threads used to abort one now and then
    out = tmp_path / "run"
    shutil.copytree(two_process_run[0], out)
    masks = target_masks(out)
    for _ in range(4):
        output = finish(torchrun(2, out, "--resume"))
        assert "SIGABRT" not in output and "terminate called" not in output
        assert "resuming after step" in output
    assert target_masks(out) == masks


def _rank_pid(rank: int, marker: str) -> int:
    """The pid of the worker started with RANK=rank and our marker in its environment (Linux /proc)."""
    for child in Path("/proc").iterdir():
        try:
            environ = (child / "environ").read_bytes().split(b"\0") if child.name.isdigit() else []
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ and marker.encode() in environ:
            return int(child.name)
    raise AssertionError(f"no worker with RANK={rank}")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the worker through /proc")
def test_a_killed_rank_ends_the_run_and_it_resumes(tmp_path, two_process_run):
    out = tmp_path / "run"
    marker = f"FASTMASK_TEST_RUN={tmp_path.name}"
    launcher = torchrun(2, out, env=dict([marker.split("=")]))
    steps = out / "steps.csv"
    deadline = time.monotonic() + 600
    while not (steps.is_file() and len(steps.read_text().splitlines()) >= 4):  # header + 3 BCD steps
        assert launcher.poll() is None, launcher.communicate()[0][-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.2)
    os.kill(_rank_pid(1, marker), signal.SIGKILL)
    killed_at = time.monotonic()
    output, _ = launcher.communicate(timeout=300)
    assert time.monotonic() - killed_at < 60  # the whole run ends within a bounded time
    assert launcher.returncode != 0
    assert "rank      : 1" in output  # torchrun names the dead rank

    # on disk: the last completed step, whole (the masks are the ones that step left)
    model = fm.checkpoint.load_model(out / "snl" / "model.safetensors")
    saved = load_state(out / STATE_FILE, model, torch.Generator())
    assert len(saved["history"]) >= 3
    assert MaskSet(model).count() == saved["history"][-1]["budget_after"]
    one_process = tmp_path / "one"
    shutil.copytree(out, one_process)

    # resumed with the same number of processes: bit for bit the uninterrupted run
    finish(torchrun(2, out, "--resume"))
    reference = two_process_run[0]
    assert target_masks(out) == target_masks(reference)
    for budget in (2000, 1200):
        ours = fm.checkpoint.load_model(out / "targets" / str(budget) / "model.safetensors").state_dict()
        theirs = fm.checkpoint.load_model(reference / "targets" / str(budget) / "model.safetensors").state_dict()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)

    # resumed with one process: it goes on from the same step to exact targets (not bit for bit: BatchNorm then
    # normalizes over whole batches instead of each process's half)
    output = finish(torchrun(1, one_process, "--resume"))
    assert f"resuming after step {len(saved['history'])}" in output
    assert sorted(target_masks(one_process)) == [1200, 2000]
