"""Bench: batched hypothesis scoring (fastmask.score_hypotheses) vs the sequential plain-PyTorch loop.

Baseline ("sequential"): what the authors' code does: each candidate alone, its ReLUs removed from the model's masks,
then model(images) in batches of 128 in eval mode, the masks put back after. Both sides score the same candidates on
the same images and must agree on every candidate's correct count (checked here too).
Measured: candidates per second of each, the ratio batched / sequential, and the fraction of conv FLOPs that prefix
sharing skipped (computed analytically from the first block any candidate touches: the stem and the blocks before it
run once instead of K times).

- CUDA (skips without a GPU): ResNet18, 100 classes, 32x32, width 64, a 1,024-image subset, K = 8 and 50;
  batched runs the fused conv_bn_act path (and, as a second row, the module path). Target: >= 4x sequential.
  The same for torchvision's resnet18 converted (fm.convert; `--arch torchvision:resnet18`), K = 50: its fused rows
  run the rewritten graph (fastmask.search.fused_graph) beside its module stages.
- CPU: a reduced case (width 16, 256 images, K = 8). Target: batched >= 0.95x sequential. Scoring's first call
  times its stacked part at a few pass sizes and keeps the fastest per image (fastmask.search.cpu_pass): one pass of
  all 2,048 rows streams every activation through memory and loses to the loop's 128-image forwards, and the cache
  size the OS reports (cpu_last_level_cache_bytes in the JSON) may be its VM host's. The table and the JSON give the
  pass size chosen (cpu_pass_rows) and each size's time per image (cpu_pass_ms_per_image_by_rows). The first call
  also keeps freed memory in the process (fastmask.cpu_memory; cpu_kept_trim_bytes in the JSON), from then on for
  the loop too: the agreement check runs both once before the timing, so both are timed without glibc's page faults
  and without the measurement.
Candidates are DRC = 100 ReLUs sampled uniformly from the present ones (MaskSet.sample), as a BCD step draws them.

Racing (`--scoring race`) against exact scoring (`--scoring exact`, Algorithm 2's rule: candidates in order on the
whole subset, stop at the first whose drop < ADT), one BCD step's scoring each, the same candidates and images:
image-forwards and seconds per step, and the ratios exact / race. The labels are the model's own predictions with its
current masks, so the reference is 100% and a candidate's drop is the share of images its removal changes, as on a
trained model where every removal costs something (most steps of the fidelity runs fell back: no candidate within
ADT, so exact scores all RT). CPU: width 16, 1,024 images, RT 8; CUDA: width 64, 2,048 images, RT 8 and 50.

Run: python -m pytest bench/test_scoring_bench.py -q --benchmark-json=bench/results/scoring.json
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastmask as fm
from fastmask import cpu_memory
from fastmask.config import BCDConfig
from fastmask.models import external
from fastmask.search import cpu_pass, fused_forward
from fastmask.search.bcd import choose
from fastmask.search.racing import race
from fastmask.search.scoring import first_differing_block, score_current, score_hypotheses

CLASSES, IMAGE = 100, 32
DRC = 100
SEQUENTIAL_BATCH = 128
TABLE = "scoring: batched score_hypotheses vs sequential plain loop (each candidate alone, batches of 128)"
RACE_TABLE = "racing: one BCD step's scoring, race (successive halving) vs exact (first candidate under ADT, in order)"
ADT = BCDConfig().adt


# Where in a search a step scores: (share of the ReLUs still present, DRC). "late" is the fidelity runs' first step
# at their small scale, 300 of the 6,000 ReLUs of B_ref (5% of 122,880, then 5% of those).
STAGES = {"mid-search": (0.5, lambda present: DRC), "late": (0.05, lambda present: round(0.05 * present))}


def make_case(width: int, n_images: int, k: int, device: torch.device, seed: int = 0, stage: str = "mid-search",
              arch: str = "resnet18"):
    """fastmask's resnet18 at `width`, or a converted arch (torchvision:<name>: its own width) as --arch builds it."""
    torch.manual_seed(seed)
    if arch == "resnet18":
        model = fm.models.create(arch, CLASSES, IMAGE, width=width)
    else:
        model = external.build(arch, CLASSES, IMAGE)
    model = model.to(device).eval()
    ms = fm.MaskSet(model)
    g = torch.Generator().manual_seed(seed)
    share, drc = STAGES[stage]
    ms.remove(ms.sample(ms.total() - round(share * ms.total()), g))
    candidates = [ms.sample(drc(ms.count()), g) for _ in range(k)]
    images = torch.randn(n_images, 3, IMAGE, IMAGE, generator=g).to(device)
    labels = torch.randint(0, CLASSES, (n_images,), generator=g).to(device)
    return model, candidates, images, labels


def sequential_scores(model: nn.Module, candidates, images, labels) -> torch.Tensor:
    """The baseline: one candidate at a time, plain model(images) in batches of 128. Returns correct counts."""
    ms = fm.MaskSet(model)
    saved = ms.snapshot()
    correct = []
    with torch.no_grad():
        for candidate in candidates:
            ms.remove(candidate)
            hits, loss = 0, 0.0
            for start in range(0, images.shape[0], SEQUENTIAL_BATCH):
                logits = model(images[start:start + SEQUENTIAL_BATCH])
                target = labels[start:start + SEQUENTIAL_BATCH]
                hits += (logits.argmax(1) == target).sum()
                loss += F.cross_entropy(logits, target, reduction="sum")  # computed, as a BCD step needs it
            correct.append(int(hits))
            ms.restore(saved)
    return torch.tensor(correct)


def conv_flops_per_stage(model: nn.Module, image: torch.Tensor) -> list[float]:
    """Conv multiply-adds x 2 of one image, per stage: [stem, block 0, block 1, ...] (the head has no conv)."""
    flops: dict[int, float] = {}
    owner = {id(m): i + 1 for i, block in enumerate(model.blocks) for m in block.modules()}

    def hook(module, args, output):
        stage = owner.get(id(module), 0)
        kernel = module.weight.shape[1] * module.weight.shape[2] * module.weight.shape[3]
        flops[stage] = flops.get(stage, 0.0) + 2.0 * kernel * output[0].numel()

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    try:
        with torch.no_grad():
            model(image[:1])
    finally:
        for h in handles:
            h.remove()
    return [flops.get(i, 0.0) for i in range(len(model.blocks) + 1)]


def prefix_skipped_fraction(model: nn.Module, candidates, images) -> tuple[float, int | None]:
    """(fraction of the sequential loop's conv FLOPs that the shared prefix does not repeat, first differing block):
    (K-1) x prefix / (K x all), the prefix being the stem and the blocks before the first differing one."""
    per_stage = conv_flops_per_stage(model, images)
    first = first_differing_block(model, candidates)
    shared_stages = len(per_stage) if first is None else first + 1  # stem + blocks before the first difference
    k = len(candidates)
    return (k - 1) * sum(per_stage[:shared_stages]) / (k * sum(per_stage)), first


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def interleaved_seconds(functions: dict, device: torch.device, rounds: int) -> dict[str, float]:
    """Median wall seconds of each function, alternating rounds so load drift hits every side alike. No warm-up
    here: run_case's agreement check has already run every function once (kernels compiled, allocator warm)."""
    samples = {name: [] for name in functions}
    for _ in range(rounds):
        for name, fn in functions.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def cpu_model() -> str:
    """The CPU's model name as Linux reports it ('cpu' elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "cpu"


def run_case(benchmark, bench_table, device: torch.device, width: int, n_images: int, k: int, rounds: int,
             fused_variants: dict[str, bool | None], arch: str = "resnet18"):
    model, candidates, images, labels = make_case(width, n_images, k, device, arch=arch)
    cpu_pass.forget()  # the agreement check below measures this case's pass size, then the timing reuses it
    expected = sequential_scores(model, candidates, images, labels)
    mismatch = {}
    for name, fused in fused_variants.items():
        got = score_hypotheses(model, candidates, images, labels, fused=fused)
        mismatch[name] = int((got.correct - expected).abs().max())
        # CPU: the same kernels at another batch size, counts agree exactly. CUDA: cuDNN and the fused kernel may
        # both use TF32, so a near-tie image can flip; more than 1% would be a bug, not rounding.
        allowed = 0 if device.type == "cpu" else n_images // 100
        assert mismatch[name] <= allowed, f"{name} disagrees with the sequential loop by {mismatch[name]} images"

    functions = {"sequential": lambda: sequential_scores(model, candidates, images, labels)}
    for name, fused in fused_variants.items():
        functions[name] = (lambda f: lambda: score_hypotheses(model, candidates, images, labels, fused=f))(fused)
    seconds = interleaved_seconds(functions, device, rounds)
    skipped, first = prefix_skipped_fraction(model, candidates, images)

    on_cpu = device.type == "cpu"
    info = {"device": torch.cuda.get_device_name() if device.type == "cuda" else cpu_model(),
            "threads": torch.get_num_threads(), "arch": arch, "width": width, "images": n_images, "K": k, "drc": DRC,
            "first_differing_block": first, "prefix_conv_flops_skipped": skipped,
            "max_correct_count_mismatch": mismatch,
            "cpu_last_level_cache_bytes": cpu_pass.last_level_cache_bytes() if on_cpu else None,
            "cpu_kept_trim_bytes": cpu_memory.kept_trim_bytes() if on_cpu else None,
            "sequential_s": seconds["sequential"], "sequential_candidates_per_s": k / seconds["sequential"]}
    passes = {"rows": "", "ms_per_image_by_rows": ""}
    if on_cpu:
        [measured] = cpu_pass.measured()  # one model, one first differing block: one measurement
        passes = {"rows": measured["rows"], "ms_per_image_by_rows": " ".join(
            f"{rows}:{ms:.3f}" for rows, ms in measured["ms_per_image_by_rows"].items())}
        info.update({"cpu_pass_rows": measured["rows"], "cpu_pass_measure_s": measured["measure_seconds"],
                     "cpu_pass_ms_per_image_by_rows": measured["ms_per_image_by_rows"]})
    bench_table(TABLE, variant="sequential (baseline)", device=info["device"], arch=arch, width=width,
                images=n_images, K=k,
                seconds=seconds["sequential"], cand_per_s=k / seconds["sequential"], ratio=1.0,
                prefix_flops_skipped="", pass_rows=SEQUENTIAL_BATCH if on_cpu else "", ms_per_image_by_rows="")
    for name in fused_variants:
        ratio = seconds["sequential"] / seconds[name]
        info[f"{name}_s"] = seconds[name]
        info[f"{name}_candidates_per_s"] = k / seconds[name]
        info[f"{name}_vs_sequential"] = ratio
        bench_table(TABLE, variant=name, device=info["device"], arch=arch, width=width, images=n_images, K=k,
                    seconds=seconds[name], cand_per_s=k / seconds[name], ratio=ratio,
                    prefix_flops_skipped=f"{100 * skipped:.2f}%", pass_rows=passes["rows"],
                    ms_per_image_by_rows=passes["ms_per_image_by_rows"])
    benchmark.extra_info.update(info)
    fused = next(iter(fused_variants.values()))
    benchmark.pedantic(lambda: score_hypotheses(model, candidates, images, labels, fused=fused), rounds=1,
                       iterations=1)
    return info


def test_scoring_cpu(benchmark, bench_table):
    info = run_case(benchmark, bench_table, torch.device("cpu"), width=16, n_images=256, k=8, rounds=7,
                    fused_variants={"batched": False})
    assert info["batched_vs_sequential"] >= 0.95, "batched scoring must not be slower than the sequential loop"


@pytest.mark.cuda
@pytest.mark.parametrize("k", [8, 50])
def test_scoring_cuda(benchmark, bench_table, k):
    variants = {"batched (modules)": False}
    if fused_forward.available():
        variants = {"batched (fused)": True, **variants}
    run_case(benchmark, bench_table, torch.device("cuda"), width=64, n_images=1024, k=k, rounds=3,
             fused_variants=variants)


@pytest.mark.cuda
def test_scoring_converted_cuda(benchmark, bench_table):
    """torchvision's resnet18 through fm.convert: the rewritten graph's fused chains vs its module stages."""
    variants = {"batched (modules)": False}
    if fused_forward.available():
        variants = {"batched (fused graph)": True, **variants}
    run_case(benchmark, bench_table, torch.device("cuda"), width=64, n_images=1024, k=50, rounds=3,
             fused_variants=variants, arch="torchvision:resnet18")


def own_predictions(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The model's predictions with its current masks: as labels they make every removal cost accuracy."""
    with torch.inference_mode():
        return torch.cat([model(images[i:i + SEQUENTIAL_BATCH]).argmax(1)
                          for i in range(0, images.shape[0], SEQUENTIAL_BATCH)])


def run_race_case(benchmark, bench_table, device: torch.device, width: int, n_images: int, k: int, rounds: int,
                  stage: str):
    model, candidates, images, _ = make_case(width, n_images, k, device, stage=stage)
    labels = own_predictions(model, images)
    reference = score_current(model, images, labels)

    def exact():
        scores = score_hypotheses(model, candidates, images, labels, reference=reference, adt=ADT)
        choice, fallback = choose(scores, reference, "accuracy")
        return choice, fallback, reference[0] - float(scores.accuracy[choice]), int(scores.scored) * n_images

    def racing():
        result = race(model, candidates, images, labels, reference=reference, adt=ADT)
        return result.best, result.accepted is None, reference[0] - result.best_scores[0], result.forward_images

    picks = {"exact": exact(), "race": racing()}  # also the warm-up of both
    seconds = interleaved_seconds({"exact": exact, "race": racing}, device, rounds)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    info = {"device": name, "threads": torch.get_num_threads(), "width": width, "images": n_images, "K": k,
            "stage": stage, "present": fm.MaskSet(model).count(), "drc": int(candidates[0].numel()), "adt": ADT,
            "same_pick": picks["exact"][0] == picks["race"][0]}
    for variant, (pick, fallback, drop, forwards) in picks.items():
        info.update({f"{variant}_s": seconds[variant], f"{variant}_forward_images": forwards,
                     f"{variant}_pick": pick, f"{variant}_fallback": fallback, f"{variant}_drop": drop})
        bench_table(RACE_TABLE, variant="exact (baseline)" if variant == "exact" else variant, device=name,
                    width=width, stage=stage, present=info["present"], drc=info["drc"], images=n_images, K=k,
                    forward_images=forwards, seconds=seconds[variant],
                    images_saved=f"{picks['exact'][3] / forwards:.2f}x",
                    time_saved=f"{seconds['exact'] / seconds[variant]:.2f}x", pick=pick, drop=drop,
                    fallback=fallback)
    info["race_images_vs_exact"] = picks["exact"][3] / picks["race"][3]
    info["race_seconds_vs_exact"] = seconds["exact"] / seconds["race"]
    benchmark.extra_info.update(info)
    benchmark.pedantic(racing, rounds=1, iterations=1)
    return info


@pytest.mark.parametrize("stage", list(STAGES))
def test_race_vs_exact_cpu(benchmark, bench_table, stage):
    info = run_race_case(benchmark, bench_table, torch.device("cpu"), width=16, n_images=1024, k=8, rounds=2,
                         stage=stage)
    if info["exact_fallback"]:  # exact scored every candidate on every image; the race cannot spend more
        assert info["race_forward_images"] < info["exact_forward_images"]


@pytest.mark.cuda
@pytest.mark.parametrize("stage", list(STAGES))
@pytest.mark.parametrize("k", [8, 50])
def test_race_vs_exact_cuda(benchmark, bench_table, k, stage):
    run_race_case(benchmark, bench_table, torch.device("cuda"), width=64, n_images=2048, k=k, rounds=3, stage=stage)
