"""score_hypotheses against the plain loop (each candidate alone on a deep copy, model(images)): counts, losses,
prefix sharing, chunking, early stop, the mask index of each group, polynomial sites, state left behind, the CPU's
rows per pass (measured, never the reported cache size alone), and the fused block path."""
import copy
import itertools
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import randomize_batchnorm, run_with_interpreted_triton

import fastmask as fm
from fastmask import cpu_memory, report
from fastmask.errors import FastmaskError
from fastmask.ops import reference
from fastmask.search import cpu_pass, fused_forward, scoring
from fastmask.search.scoring import first_differing_block, score_current, score_hypotheses

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
WIDTHS = {"resnet18": 4, "wide_resnet22_8": 8}
IMAGE = 8
CLASSES = 10


pytestmark = pytest.mark.usefixtures("one_thread")
MEASURE = cpu_pass.measure  # the real measurement, for the tests of it


@pytest.fixture(autouse=True)
def largest_cpu_pass(monkeypatch):
    """Tests here count the batches each block sees: the CPU pass size is pinned to the largest the call allows (no
    timing forwards, no cut), except where a test puts the measurement back (MEASURE)."""
    cpu_pass.forget()
    monkeypatch.setattr(cpu_pass, "measure", lambda forward, sample, max_rows, cache_rows, where=None:
                        cpu_pass.PassSize(cpu_pass.ladder(max_rows, cache_rows)[-1], {}, 0.0, cache_rows))
    yield
    cpu_pass.forget()


def _randomize(model: nn.Module, seed: int) -> nn.Module:
    """BN statistics and affine away from identity, a sharp head: candidates then change logits visibly."""
    return randomize_batchnorm(model, seed, head_scale=20.0)


def make_model(arch: str, seed: int = 0, removed_fraction: float = 0.3, polynomial: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    model = _randomize(fm.models.create(arch, CLASSES, IMAGE, width=WIDTHS[arch], polynomial=polynomial), seed)
    if polynomial:  # coefficients away from the identity start, different per channel and site
        g = torch.Generator().manual_seed(seed + 1)
        for _, site in fm.masked_sites(model):
            if site.coeffs is None:  # a site after a residual add keeps the identity
                continue
            c = site.coeffs.shape[0]
            site.coeffs.data.copy_(torch.stack([0.1 * torch.randn(c, generator=g),
                                                0.5 + 0.3 * torch.rand(c, generator=g),
                                                0.05 * torch.randn(c, generator=g)], dim=1))
    ms = fm.MaskSet(model)
    ms.remove(ms.sample(int(ms.total() * removed_fraction), torch.Generator().manual_seed(seed)))
    model.train()  # scoring must switch to eval itself (BN batch statistics would change every count)
    return model


def make_data(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, IMAGE, IMAGE, generator=g), torch.randint(0, CLASSES, (n,), generator=g)


def sample_candidates(model, k: int, size: int, seed: int = 1, sites=None):
    """k candidates of `size` present ReLUs each, drawn from all sites or only from `sites`."""
    ms = fm.MaskSet(model)
    g = torch.Generator().manual_seed(seed)
    present = ms.present()
    if sites is not None:
        present = present[torch.isin(ms.site_of(present), torch.tensor(sites))]
    return [present[torch.randperm(present.numel(), generator=g)[:size]].sort().values for _ in range(k)]


def plain_scores(model, candidates, images, labels):
    """The oracle: each candidate alone, applied with MaskSet.remove on a deep copy, one plain forward."""
    correct, loss, logits_all = [], [], []
    for candidate in candidates:
        alone = copy.deepcopy(model).eval()
        fm.MaskSet(alone).remove(candidate)
        with torch.no_grad():
            logits = alone(images)
        correct.append(int((logits.argmax(1) == labels).sum()))
        loss.append(float(F.cross_entropy(logits, labels)))
        logits_all.append(logits)
    return torch.tensor(correct), torch.tensor(loss, dtype=torch.float64), logits_all


def assert_matches_plain(scores, candidates, model, images, labels):
    correct, loss, _ = plain_scores(model, candidates, images, labels)
    assert scores.scored == len(candidates)
    assert torch.equal(scores.correct, correct)
    torch.testing.assert_close(scores.loss, loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(scores.accuracy, 100.0 * correct.double() / labels.numel())


class BatchRecorder:
    """Records the batch size each block sees, so tests can tell shared (N) from stacked (K*N) execution."""

    def __init__(self, model):
        self.sizes = {i: [] for i in range(len(model.blocks))}
        self.handles = [block.register_forward_pre_hook(self._hook(i)) for i, block in enumerate(model.blocks)]

    def _hook(self, index):
        def hook(module, args):
            self.sizes[index].append(args[0].shape[0])
        return hook

    def close(self):
        for handle in self.handles:
            handle.remove()


# ---- equality with the plain loop ------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["resnet18", "wide_resnet22_8"])
@pytest.mark.parametrize("n, batch_size", [(8, 512), (32, 512), (20, 8)])
def test_matches_plain_loop(arch, n, batch_size):
    model = make_model(arch)
    images, labels = make_data(n)
    candidates = sample_candidates(model, 5, size=200)
    scores = score_hypotheses(model, candidates, images, labels, batch_size=batch_size)
    assert_matches_plain(scores, candidates, model, images, labels)
    assert scores.accepted is None


def test_matches_plain_loop_on_real_images():
    path = DATA / "cifar10_subset.npz"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    with np.load(path) as data:
        x = torch.from_numpy(data["x_train"][:24]).permute(0, 3, 1, 2).float() / 255.0
        labels = torch.from_numpy(data["y_train"][:24].astype(np.int64))
    images = (x - x.mean(dim=(0, 2, 3), keepdim=True)) / x.std(dim=(0, 2, 3), keepdim=True)
    torch.manual_seed(0)
    model = _randomize(fm.models.create("resnet18", 10, 32, width=4), 0)
    candidates = sample_candidates(model, 4, size=2000)
    scores = score_hypotheses(model, candidates, images, labels, batch_size=16)
    assert_matches_plain(scores, candidates, model, images, labels)


def test_candidates_are_distinct_and_each_group_gets_its_own_mask():
    """Candidates with clearly different losses, scored in two orders: a wrong mask index (n % K instead of
    n // K, or a shifted group) would swap or mix the per-candidate results."""
    model = make_model("resnet18")
    images, labels = make_data(16)
    ms = fm.MaskSet(model)
    present = ms.present()
    sites = ms.site_of(present)
    # Each candidate linearizes a whole different site (plus one shared early removal so all share no prefix).
    candidates = [present[sites == s] for s in (0, 5, 9, 14)]
    correct, loss, _ = plain_scores(model, candidates, images, labels)
    gaps = (loss.unsqueeze(0) - loss.unsqueeze(1)).abs() + torch.eye(len(candidates)) * 1e9
    assert float(gaps.min()) > 1e-3, "the test needs candidates with distinct losses"
    forward = score_hypotheses(model, candidates, images, labels)
    backward = score_hypotheses(model, candidates[::-1], images, labels)
    torch.testing.assert_close(forward.loss, loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(backward.loss, loss.flip(0), rtol=1e-5, atol=1e-6)
    assert torch.equal(forward.correct, correct) and torch.equal(backward.correct, correct.flip(0))


def test_empty_candidate_scores_the_current_masks():
    model = make_model("wide_resnet22_8")
    images, labels = make_data(16)
    acc, loss = score_current(model, images, labels, batch_size=5)
    scores = score_hypotheses(model, [torch.empty(0, dtype=torch.int64)] * 2, images, labels)
    assert first_differing_block(model, [torch.empty(0, dtype=torch.int64)]) is None
    _, plain_loss, _ = plain_scores(model, [torch.empty(0, dtype=torch.int64)], images, labels)
    assert scores.accuracy.tolist() == [acc, acc]
    assert loss == pytest.approx(float(plain_loss[0]), rel=1e-5)
    torch.testing.assert_close(scores.loss, torch.tensor([loss, loss], dtype=torch.float64))


def test_model_without_blocks_is_scored_whole():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * IMAGE * IMAGE, 6),
                        nn.ReLU(), nn.Linear(6, CLASSES))
    images, labels = make_data(12)
    model = fm.convert(net, images[:1])
    candidates = sample_candidates(model, 3, size=100)
    assert first_differing_block(model, candidates) == -1  # no blocks: the whole model repeats
    assert_matches_plain(score_hypotheses(model, candidates, images, labels), candidates, model, images, labels)


# ---- polynomial sites ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["resnet18", "wide_resnet22_8"])
@pytest.mark.parametrize("fused", [False, True], ids=["modules", "fused"])
def test_polynomial_sites_match_sequential_module_scoring(arch, fused, monkeypatch):
    """Removed ReLUs become c0 + c1 x + c2 x^2 per channel: batched scoring (module path, or the fused path with the
    reference op standing in for the kernel) equals each candidate scored alone through the modules."""
    if fused:
        monkeypatch.setattr(fused_forward, "_conv_bn_act", lambda: reference.conv_bn_act)
    model = make_model(arch, polynomial=True)
    images, labels = make_data(12)
    candidates = sample_candidates(model, 5, size=150)
    scores = score_hypotheses(model, candidates, images, labels, fused=fused, chunk_size=3, batch_size=8)
    assert torch.isfinite(scores.loss).all()
    assert_matches_plain(scores, candidates, model, images, labels)
    acc, loss = score_current(model, images, labels, fused=fused)
    assert (acc, loss) == pytest.approx(score_current(model, images, labels, fused=False), rel=1e-5)
    # The coefficients matter here: with identity replacements the same candidates score otherwise.
    identity = copy.deepcopy(model)
    for _, site in fm.masked_sites(identity):
        if site.coeffs is not None:
            site.coeffs.data.copy_(torch.tensor([0.0, 1.0, 0.0]))
    _, identity_loss, _ = plain_scores(identity, candidates, images, labels)
    assert (identity_loss - scores.loss).abs().min() > 1e-3


# ---- prefix sharing ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["resnet18", "wide_resnet22_8"])
@pytest.mark.parametrize("where", ["early", "late"])
def test_prefix_runs_once_and_results_match(arch, where):
    model = make_model(arch)
    images, labels = make_data(12)
    n_sites = len(fm.MaskSet(model).sites)
    sites = [0] if where == "early" else [n_sites - 2, n_sites - 1]  # first block vs last block only
    k = 4
    candidates = sample_candidates(model, k, size=40, sites=sites)
    first = first_differing_block(model, candidates)
    assert first == (0 if where == "early" else len(model.blocks) - 1)
    recorder = BatchRecorder(model)
    try:
        scores = score_hypotheses(model, candidates, images, labels)
    finally:
        recorder.close()
    assert_matches_plain(scores, candidates, model, images, labels)
    for index, sizes in recorder.sizes.items():
        stacked = [s for s in sizes if s == k * 12]
        if index < first:
            assert sizes == [12], f"block {index} is shared: it sees the batch once"
        else:
            assert stacked, f"block {index} comes after the first difference and must see K*N images"


def test_chunk_whose_candidates_start_later_shares_more():
    """Two chunks: the first touches block 0, the second only the last block; the second chunk's expansion
    happens at the last block, and results still match."""
    model = make_model("resnet18")
    images, labels = make_data(8)
    n_sites = len(fm.MaskSet(model).sites)
    early = sample_candidates(model, 2, size=30, sites=[0], seed=3)
    late = sample_candidates(model, 2, size=30, sites=[n_sites - 1], seed=4)
    candidates = early + late
    recorder = BatchRecorder(model)
    try:
        scores = score_hypotheses(model, candidates, images, labels, chunk_size=2)
    finally:
        recorder.close()
    assert_matches_plain(scores, candidates, model, images, labels)
    second_block = recorder.sizes[1]  # chunk 1 (stacked), chunk 2 (shared)
    assert second_block == [16, 8]


# ---- chunking ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["resnet18", "wide_resnet22_8"])
def test_chunking_gives_identical_results(arch):
    model = make_model(arch)
    images, labels = make_data(16)
    candidates = sample_candidates(model, 5, size=150)
    whole = score_hypotheses(model, candidates, images, labels, batch_size=16)
    recorder = BatchRecorder(model)
    try:
        tiny = score_hypotheses(model, candidates, images, labels, batch_size=6, memory_budget_mb=1e-6)
    finally:
        recorder.close()
    assert recorder.sizes[0] == [5, 5, 6] * 5, "a tiny budget means one candidate per chunk"
    pairs = score_hypotheses(model, candidates, images, labels, chunk_size=2)
    for other in (tiny, pairs):
        assert torch.equal(other.correct, whole.correct)
        torch.testing.assert_close(other.loss, whole.loss, rtol=1e-5, atol=1e-6)
    assert_matches_plain(whole, candidates, model, images, labels)


# resnet18 width 4 at 8x8: layer1's activation is 4*8*8 fp32 = 1 KiB per image, 4 live x 8 images -> 32 KiB a candidate
PER_CANDIDATE_MB = scoring.LIVE_ACTIVATIONS * 4 * IMAGE * IMAGE * 4 * 8 / 2**20


@pytest.mark.parametrize("site, k, batch_sizes", [
    # site 0 is in layer1[0]: only the stem's output is kept, and half of the 7-candidate budget is 3 per chunk
    (0, 6, {0: [24, 24]}),
    # site 5 is in layer2[0] (block 2, stride 2, sites of 8 x 4 x 4): blocks 0-1 run once at batch N, and block 2's
    # input, repeated K times, is layer1's 4 x 8 x 8 output, which the chunk must be sized by
    (5, 8, {0: [8], 1: [8], 2: [24, 24, 16]}),
])
def test_memory_budget_sets_the_chunk(site, k, batch_sizes):
    model = make_model("resnet18")
    images, labels = make_data(8)
    candidates = sample_candidates(model, k, size=20, sites=[site])
    recorder = BatchRecorder(model)
    try:
        score_hypotheses(model, candidates, images, labels, memory_budget_mb=7 * PER_CANDIDATE_MB)
    finally:
        recorder.close()
    assert {block: recorder.sizes[block] for block in batch_sizes} == batch_sizes


# ---- rows per pass on the CPU --------------------------------------------------------------------------------------
# Candidates touch site 0 only (block 0): the stacked part starts at block 0, whose largest activation is the stem's
# 4 x 8 x 8 output, so one row (image x candidate) keeps LIVE_ACTIVATIONS x 256 fp32 = 4 KiB live.
ROW_BYTES = scoring.LIVE_ACTIVATIONS * 4 * IMAGE * IMAGE * 4
VM_CACHE_BYTES = 480 * 2**20  # what a 2-core VM reported as its last-level cache: its host's whole L3


def fake_timing(per_image, calls: list, unit: float = 1e-6):
    """A stand-in for cpu_pass.seconds_per_image: the per-image time the test says each pass size takes, a dict or a
    function of the rows (in `unit` seconds: microseconds keep the measurement within its time budget)."""
    lookup = per_image if callable(per_image) else per_image.__getitem__

    def seconds_per_image(forward, batch):
        calls.append(batch.shape[0])
        return unit * lookup(batch.shape[0])
    return seconds_per_image


@pytest.mark.parametrize("per_image_by_rows, tried, block0_sizes", [
    # smaller is faster: from 128 up to 256 is slower, so down to 64 and 32; passes of 32 images, one candidate
    ({32: 1.0, 64: 2.0, 128: 4.0, 256: 8.0}, [128, 256, 64, 32], [32, 32] * 4),
    # 128 is fastest: two candidates of 64 images a pass
    ({32: 3.0, 64: 2.0, 128: 1.0, 256: 1.5}, [128, 256, 64], [128, 128]),
    # larger is faster up to the call's 256 rows: all four candidates in one pass
    ({128: 2.0, 256: 1.0}, [128, 256], [256]),
    # within 3% of the fastest counts as as fast: the smaller pass wins
    ({128: 1.0, 256: 0.99}, [128, 256], [128, 128]),
])
def test_cpu_pass_follows_the_measurement_not_the_reported_cache(monkeypatch, per_image_by_rows, tried,
                                                                 block0_sizes):
    """A faked 480 MiB cache would allow every row of the call (4 candidates x 64 images) in one pass; the
    measurement decides."""
    monkeypatch.setattr(cpu_pass, "measure", MEASURE)
    monkeypatch.setattr(cpu_pass, "last_level_cache_bytes", lambda: VM_CACHE_BYTES)
    calls = []
    monkeypatch.setattr(cpu_pass, "seconds_per_image", fake_timing(per_image_by_rows, calls))
    model = make_model("resnet18")
    images, labels = make_data(64)
    candidates = sample_candidates(model, 4, size=20, sites=[0])
    recorder = BatchRecorder(model)
    try:
        scores = score_hypotheses(model, candidates, images, labels)
    finally:
        recorder.close()
    assert calls == tried
    assert recorder.sizes[0] == block0_sizes
    assert_matches_plain(scores, candidates, model, images, labels)
    [chosen] = cpu_pass.measured()
    assert chosen["reported_cache_rows"] == VM_CACHE_BYTES // ROW_BYTES
    assert chosen["max_rows"] == 4 * 64 and chosen["stacked_from_stage"] == 1
    assert list(chosen["ms_per_image_by_rows"]) == [str(rows) for rows in sorted(tried)]


def test_cpu_pass_is_measured_once_per_model_shape_and_reported(monkeypatch):
    monkeypatch.setattr(cpu_pass, "measure", MEASURE)
    calls = []
    monkeypatch.setattr(cpu_pass, "seconds_per_image", fake_timing(lambda rows: rows, calls))  # smaller is faster
    images, labels = make_data(64)
    for seed in (0, 1):  # another model of the same shape: the choice is kept
        model = make_model("resnet18", seed=seed)
        score_hypotheses(model, sample_candidates(model, 4, size=20, sites=[0]), images, labels)
    assert calls == [128, 256, 64, 32]
    model = make_model("wide_resnet22_8")  # another shape: measured again
    score_hypotheses(model, sample_candidates(model, 4, size=20, sites=[0]), images, labels)
    assert calls == [128, 256, 64, 32] * 2
    passes = report.machine()["cpu_scoring_passes"]
    assert [p["model"] for p in passes] == ["ResNet18", "WideResNet22"] and {p["rows"] for p in passes} == {32}


def test_write_report_records_the_pass_sizes_measured_during_the_run(monkeypatch, tmp_path):
    import json
    summary = {"machine": report.machine(), "targets": []}  # taken before scoring, as the pipeline does
    assert "cpu_scoring_passes" not in summary["machine"]
    monkeypatch.setattr(cpu_pass, "measure", MEASURE)
    monkeypatch.setattr(cpu_pass, "seconds_per_image", fake_timing(lambda rows: rows, []))
    model = make_model("resnet18")
    images, labels = make_data(64)
    score_hypotheses(model, sample_candidates(model, 4, size=20, sites=[0]), images, labels)
    report.write_report(tmp_path, summary, [])
    written = json.loads((tmp_path / "summary.json").read_text())
    assert [p["rows"] for p in written["machine"]["cpu_scoring_passes"]] == [32]


@pytest.mark.parametrize("n", [100, 64])
def test_measured_pass_size_does_not_change_scores(monkeypatch, n):
    """The smallest pass (32 rows: image batches cut to near-equal parts, one candidate a pass) against the largest
    (every image of every candidate at once): bit for bit the same scores, with and without early stop."""
    monkeypatch.setattr(cpu_pass, "measure", MEASURE)
    model = make_model("resnet18")
    images, labels = make_data(n)
    candidates = sample_candidates(model, 6, size=60)
    reference = score_current(model, images, labels)
    results = {}
    for name, per_image in {"smallest": lambda rows: rows, "largest": lambda rows: 1.0 / rows}.items():
        cpu_pass.forget()
        monkeypatch.setattr(cpu_pass, "seconds_per_image", fake_timing(per_image, []))
        recorder = BatchRecorder(model)
        try:
            whole = score_hypotheses(model, candidates, images, labels)
        finally:
            recorder.close()
        results[name] = (whole, recorder.sizes[0])
        drops = whole.drop(reference)
        adt = float(drops[3]) + 1e-9 if name == "smallest" else results["smallest"][2]
        stopped = score_hypotheses(model, candidates, images, labels, reference=reference, adt=adt)
        results[name] += (adt, stopped)
    (small, small_sizes, _, small_stop), (large, large_sizes, _, large_stop) = results.values()
    assert max(small_sizes) <= 32 and large_sizes == [6 * n], "the two runs must cut passes differently"
    for field in ("correct", "accuracy", "loss"):
        assert torch.equal(getattr(small, field), getattr(large, field)), field
    assert small_stop.accepted == large_stop.accepted is not None
    scored = min(small_stop.scored, large_stop.scored)
    assert torch.equal(small_stop.loss[:scored], large_stop.loss[:scored])
    assert_matches_plain(small, candidates, model, images, labels)


def test_real_measurement_is_recorded_and_scores_match(monkeypatch):
    monkeypatch.setattr(cpu_pass, "measure", MEASURE)
    model = make_model("resnet18")
    images, labels = make_data(64)
    candidates = sample_candidates(model, 4, size=20, sites=[0])
    scores = score_hypotheses(model, candidates, images, labels)
    assert_matches_plain(scores, candidates, model, images, labels)
    [chosen] = cpu_pass.measured()
    tried = [int(rows) for rows in chosen["ms_per_image_by_rows"]]
    assert cpu_pass.START_ROWS in tried and set(tried) <= set(cpu_pass.ladder(4 * 64, chosen["reported_cache_rows"]))
    assert chosen["rows"] in tried and chosen["measure_seconds"] < 10 * cpu_pass.MEASURE_SECONDS


@pytest.mark.parametrize("max_rows, cache_rows, sizes", [
    (20, None, [20]),  # no more rows than the smallest pass: nothing to time
    (256, None, [32, 64, 128, 256]),
    (300, 100, [32, 64, 100, 128, 256, 300]),  # the reported cache adds a rung
    (300, 10**6, [32, 64, 128, 256, 300]),  # ... clamped to what the call allows
    (10**6, None, [32 * 2**i for i in range(8)]),  # never past MAX_ROWS
])
def test_ladder(max_rows, cache_rows, sizes):
    assert cpu_pass.ladder(max_rows, cache_rows) == sizes


def test_measurement_stays_within_its_time_budget(monkeypatch):
    """A model so slow that any next size would take the measurement past MEASURE_SECONDS: it stops there."""
    calls = []
    slow = cpu_pass.MEASURE_SECONDS / (4 * 128)  # one 128-row pass is a quarter of the budget
    monkeypatch.setattr(cpu_pass, "seconds_per_image", fake_timing(lambda rows: slow, calls, unit=1.0))
    clock = itertools.chain([0.0], itertools.repeat(0.8 * cpu_pass.MEASURE_SECONDS))
    monkeypatch.setattr(cpu_pass, "clock", lambda: next(clock))
    chosen = MEASURE(lambda x: x, lambda: torch.zeros(8, 1), 256, None)
    assert calls == [128] and chosen.rows == 128


def test_cache_size_is_read_once_and_parsed():
    assert cpu_pass.last_level_cache_bytes() == cpu_pass.last_level_cache_bytes()
    size = cpu_pass.last_level_cache_bytes()
    assert size is None or size >= 2**10
    assert cpu_pass._parse_size("48K\n") == 48 * 2**10 and cpu_pass._parse_size("32M") == 32 * 2**20
    with pytest.raises(ValueError):
        cpu_pass._parse_size("lots")


_KEEP_FREED_SCRIPT = """
import platform, sys
sys.path.insert(0, {repo!r})
import torch
import fastmask as fm
from fastmask import cpu_memory
from fastmask.search.scoring import score_current
assert cpu_memory.kept_trim_bytes() is None
model = fm.models.create("resnet18", 10, 8, width=4).eval()
score_current(model, torch.randn(4, 3, 8, 8), torch.zeros(4, dtype=torch.long))
kept = cpu_memory.kept_trim_bytes()
assert cpu_memory.keep_freed_memory() == (kept > 0) and cpu_memory.kept_trim_bytes() == kept  # once a process
glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
print("kept", kept, "glibc", glibc)
"""


def test_cpu_scoring_keeps_freed_memory_once_per_process():
    """The first CPU scoring sets glibc's thresholds, and only the first."""
    script = _KEEP_FREED_SCRIPT.format(repo=str(REPO))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    kept, glibc = result.stdout.split()[1], result.stdout.split()[3]
    expected = cpu_memory.TRIM_BYTES if glibc == "True" else 0
    assert int(kept) == expected


# ---- early stop ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def early_stop_case():
    """A model, images, the reference, and a pool of candidates with their plain (sequential) drops."""
    model = make_model("resnet18", seed=2)
    images, labels = make_data(32, seed=2)
    reference_scores = score_current(model, images, labels)
    pool = sample_candidates(model, 16, size=600, seed=5)
    _, pool_loss, pool_logits = plain_scores(model, pool, images, labels)
    pool_acc = torch.tensor([100.0 * float((lo.argmax(1) == labels).sum()) / 32 for lo in pool_logits])
    drops = {"accuracy": reference_scores[0] - pool_acc, "loss": pool_loss - reference_scores[1]}
    return model, images, labels, reference_scores, pool, drops


@pytest.mark.parametrize("criterion", ["accuracy", "loss"])
@pytest.mark.parametrize("chunk_size, scored", [(2, 4), (1, 4), (3, 6), (8, 6)])
def test_early_stop_accepts_the_sequential_choice(early_stop_case, criterion, chunk_size, scored):
    """Candidates 0-2 are worse than the reference, 3 and 5 are not: sequential order accepts 3, never 5,
    and chunks after the one holding 3 are never scored."""
    model, images, labels, reference_scores, pool, all_drops = early_stop_case
    drops = all_drops[criterion]
    worse = [i for i in drops.argsort(descending=True).tolist() if drops[i] > 0][:3]
    assert len(worse) == 3, "the pool needs three candidates that hurt"
    empty = torch.empty(0, dtype=torch.int64)
    candidates = [pool[i] for i in worse] + [empty, pool[worse[0]], empty]
    adt = float(drops[worse].min()) / 2
    recorder = BatchRecorder(model)
    try:
        scores = score_hypotheses(model, candidates, images, labels, reference=reference_scores, adt=adt,
                                  criterion=criterion, chunk_size=chunk_size)
    finally:
        recorder.close()
    assert scores.accepted == 3
    assert scores.scored == scored
    assert torch.all(scores.correct[:scored] >= 0) and torch.all(scores.correct[scored:] == -1)
    assert torch.isnan(scores.loss[scored:]).all() and torch.isnan(scores.accuracy[scored:]).all()
    assert not torch.isnan(scores.loss[:scored]).any()
    chunks_run = -(-scored // chunk_size)
    assert len(recorder.sizes[0]) == chunks_run, "later chunks must not run at all"
    drop = scores.drop(reference_scores, criterion)
    assert torch.all(drop[:3] >= adt) and drop[3] < adt


def test_no_passing_candidate_scores_everything():
    model = make_model("resnet18")
    images, labels = make_data(8)
    candidates = sample_candidates(model, 4, size=50)
    scores = score_hypotheses(model, candidates, images, labels, reference=(100.0, 0.0), adt=-1.0, chunk_size=1)
    assert scores.accepted is None and scores.scored == 4


def test_bad_arguments_fail_clearly():
    model = make_model("resnet18")
    images, labels = make_data(4)
    good = sample_candidates(model, 1, size=5)
    with pytest.raises(FastmaskError, match="both reference and adt"):
        score_hypotheses(model, good, images, labels, adt=0.3)
    with pytest.raises(FastmaskError, match="criterion"):
        score_hypotheses(model, good, images, labels, reference=(1.0, 1.0), adt=0.3, criterion="top5")
    with pytest.raises(FastmaskError, match="another model"):
        score_hypotheses(model, [torch.tensor([fm.MaskSet(model).total()])], images, labels)
    with pytest.raises(FastmaskError, match="labels"):
        score_hypotheses(model, good, images, labels[:3])
    empty = score_hypotheses(model, [], images, labels)
    assert empty.scored == 0 and empty.accuracy.numel() == 0


# ---- state left behind -------------------------------------------------------------------------------------------
def test_masks_modes_and_hypotheses_restored():
    model = make_model("wide_resnet22_8")
    model.block2[0].eval()  # a mixed state: one eval submodule inside a training model
    flags = [m.training for m in model.modules()]
    ms = fm.MaskSet(model)
    before = ms.snapshot()
    images, labels = make_data(8)
    score_hypotheses(model, sample_candidates(model, 3, size=100), images, labels, chunk_size=2)
    assert [m.training for m in model.modules()] == flags
    assert all(torch.equal(a, b) for a, b in zip(before, ms.snapshot()))
    assert all(site.hypotheses is None for site in ms.sites)


def test_hypotheses_cleared_when_scoring_fails():
    model = make_model("resnet18")
    images, labels = make_data(8)
    calls = []

    def fail_on_second_chunk(module, args):
        calls.append(args[0].shape[0])
        if len(calls) == 2:  # chunk 1 runs, then chunk 2 fails mid-way
            raise RuntimeError("boom")

    handle = model.blocks[3].register_forward_pre_hook(fail_on_second_chunk)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            score_hypotheses(model, sample_candidates(model, 4, size=50), images, labels, chunk_size=2)
    finally:
        handle.remove()
    ms = fm.MaskSet(model)
    assert all(site.hypotheses is None for site in ms.sites)
    assert model.training


def test_snl_alphas_are_refused():
    model = make_model("resnet18")
    site = fm.MaskSet(model).sites[0]
    site.alpha = nn.Parameter(torch.ones(site.shape))
    images, labels = make_data(4)
    with pytest.raises(FastmaskError, match="alphas"):
        score_hypotheses(model, sample_candidates(model, 1, size=5), images, labels)


# ---- the fused block path -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["resnet18", "wide_resnet22_8"])
def test_fused_block_wiring_with_reference_op(arch, monkeypatch):
    """The per-block fused forwards (BN folding, shortcut, residual, which mask goes where) with the reference
    conv_bn_act standing in for the kernel, so the wiring is checked on any machine."""
    monkeypatch.setattr(fused_forward, "_conv_bn_act", lambda: reference.conv_bn_act)
    model = make_model(arch)
    images, labels = make_data(12)
    candidates = sample_candidates(model, 4, size=150)
    scores = score_hypotheses(model, candidates, images, labels, fused=True, chunk_size=3, batch_size=8)
    assert_matches_plain(scores, candidates, model, images, labels)
    acc, loss = score_current(model, images, labels, fused=True)
    assert (acc, loss) == pytest.approx(score_current(model, images, labels, fused=False), rel=1e-5)


def test_fused_forced_without_kernel_fails_clearly(monkeypatch):
    monkeypatch.setattr(fused_forward, "_conv_bn_act", lambda: None)
    model = make_model("resnet18")
    images, labels = make_data(4)
    with pytest.raises(FastmaskError, match="fused=False"):
        score_hypotheses(model, sample_candidates(model, 1, size=5), images, labels, fused=True)


# backends.forced() reads FASTMASK_BACKEND at every call: the oracle runs on the reference ops (fast), the fused
# path on the interpreted Triton kernels.
_FUSED_SCRIPT = """
import os, sys
sys.path.insert(0, {repo!r})
sys.path.insert(0, {tests!r})
from test_scoring import make_model, make_data, sample_candidates, assert_matches_plain
from fastmask.ops import backends
from fastmask.search.scoring import score_hypotheses
for arch in ("resnet18", "wide_resnet22_8"):
    model = make_model(arch)
    images, labels = make_data(3)
    candidates = sample_candidates(model, 2, size=60)
    os.environ["FASTMASK_BACKEND"] = "triton"
    assert backends.select("cpu", has_ext_kernel=False) == "triton", "the Triton kernel must be the one under test"
    scores = score_hypotheses(model, candidates, images, labels, fused=True)
    os.environ["FASTMASK_BACKEND"] = "torch"
    assert_matches_plain(scores, candidates, model, images, labels)
print("fused ok")
"""


def test_fused_path_with_triton_kernel_interpreted():
    """The real kernels through the fused path: Triton under TRITON_INTERPRET=1 (a fresh process, since the
    interpreter is chosen when triton.jit decorates the kernels)."""
    pytest.importorskip("triton")
    if not fused_forward.available():
        pytest.skip(f"fastmask.ops.conv_bn_act is not in this build yet ({fused_forward.unavailable_reason()})")
    run_with_interpreted_triton(_FUSED_SCRIPT.format(repo=str(REPO), tests=str(Path(__file__).parent)), "fused ok")
