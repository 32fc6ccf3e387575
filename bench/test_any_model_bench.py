"""Bench: one BCD step (its scoring and one finetune step) on converted torchvision models, beside fastmask's own
resnet18, on the CPU.

Each model is built for 10 classes at 32x32 (fastmask.models.external.build: the torchvision builder, converted) with
half of its ReLUs removed at random. One step's scoring is score_hypotheses of RT = 2 candidates of DRC = 100 ReLUs on
64 images, through the generic stacked path (the whole model, K copies of the batch); one finetune step is a
forward, backward and Adam step on a batch of 32, as a BCD step's finetune takes them. The baseline is fastmask's
resnet18 (width 64, its stem/blocks/head scoring path) measured in the same run; the table gives each model's
milliseconds and its ratio to that baseline, and the ReLU count each one starts from.

Run: python -m pytest bench/test_any_model_bench.py -q --benchmark-json=bench/results/any_model.json
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastmask as fm
from fastmask.models import external
from fastmask.search.scoring import score_hypotheses

CLASSES, IMAGE, DRC, RT, SCORE_IMAGES, BATCH = 10, 32, 100, 2, 64, 32
BASELINE = "fastmask resnet18 (width 64)"
MODELS = ["torchvision:resnet18", "torchvision:resnet50", "torchvision:vgg11_bn", "torchvision:densenet121",
          "torchvision:regnet_x_400mf", "torchvision:resnext50_32x4d"]
TABLE = f"one BCD step on the CPU, 32x32, RT {RT} x DRC {DRC} on {SCORE_IMAGES} images + one finetune step of {BATCH}"


def _case(name: str):
    torch.manual_seed(0)
    if name == BASELINE:
        model = fm.models.create("resnet18", CLASSES, IMAGE, width=64)
    else:
        model = external.build(name, CLASSES, IMAGE)
    masks = fm.MaskSet(model)
    generator = torch.Generator().manual_seed(0)
    masks.remove(masks.sample(masks.total() // 2, generator))
    candidates = [masks.sample(DRC, generator) for _ in range(RT)]
    images = torch.randn(SCORE_IMAGES, 3, IMAGE, IMAGE, generator=generator)
    labels = torch.randint(0, CLASSES, (SCORE_IMAGES,), generator=generator)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def scoring():
        score_hypotheses(model, candidates, images, labels, batch_size=SCORE_IMAGES)

    def finetune_step():
        model.train()
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(images[:BATCH]), labels[:BATCH]).backward()
        optimizer.step()

    return model, scoring, finetune_step


@pytest.fixture(scope="module")
def threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # comparable on a shared machine; every model runs under the same setting
    yield
    torch.set_num_threads(previous)


def test_bcd_step_per_model_vs_fastmask_resnet18(benchmark, bench_table, cpu_medians, threads):
    cases = {name: _case(name) for name in [BASELINE] + MODELS}
    functions = {}
    for name, (_, scoring, finetune_step) in cases.items():
        functions[f"{name}|scoring"] = scoring
        functions[f"{name}|finetune"] = finetune_step
    medians = cpu_medians(functions, rounds=3, min_seconds=0.3)
    rows = {}
    for name, (model, _, _) in cases.items():
        scoring_ms, finetune_ms = medians[f"{name}|scoring"] * 1e3, medians[f"{name}|finetune"] * 1e3
        rows[name] = {"relus": fm.MaskSet(model).total(), "scoring_ms": scoring_ms, "finetune_ms": finetune_ms}
    base = rows[BASELINE]
    for name, row in rows.items():
        row["scoring_vs_baseline"] = row["scoring_ms"] / base["scoring_ms"]
        row["finetune_vs_baseline"] = row["finetune_ms"] / base["finetune_ms"]
        bench_table(TABLE, model=name, **row)
    benchmark.pedantic(cases[BASELINE][1], rounds=1, iterations=1)
    benchmark.extra_info.update(baseline=BASELINE, rows=rows)
    assert all(row["scoring_ms"] > 0 and row["finetune_ms"] > 0 for row in rows.values())
