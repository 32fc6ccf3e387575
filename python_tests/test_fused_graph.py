"""The fused scoring path on converted models (fastmask.search.fused_graph): which chains fold, that the fused stages
compute the model, and that fused scoring gives what scoring each candidate alone with a plain forward gives. The
reference conv_bn_act stands in for the kernel so the wiring is checked on any machine; one test runs the Triton
kernel under the interpreter."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import randomized, run_with_interpreted_triton

import fastmask as fm
from fastmask.models import external
from fastmask.ops import reference
from fastmask.search import fused_forward, fused_graph
from fastmask.search.scoring import score_current, score_hypotheses

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


class Toy(nn.Module):
    """Every case the rewrite meets: conv+BN+ReLU, conv with bias and no BN, a BN -> ReLU pre-activation, a residual
    add (projected and identity), an add that broadcasts, a grouped conv (not foldable), a conv feeding two users."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(8)
        self.biased = nn.Conv2d(8, 8, 3, padding=1)  # no BN: the bias goes into the shift
        self.pre_bn = nn.BatchNorm2d(8)
        self.down = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.down_bn = nn.BatchNorm2d(16)
        self.proj = nn.Conv2d(8, 16, 1, stride=2, bias=False)
        self.proj_bn = nn.BatchNorm2d(16)
        self.grouped = nn.Conv2d(16, 16, 3, padding=1, groups=4, bias=False)
        self.grouped_bn = nn.BatchNorm2d(16)
        self.same = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.same_bn = nn.BatchNorm2d(16)
        self.channel_bias = nn.Parameter(torch.randn(16, 1, 1))
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        x = F.relu(self.stem_bn(self.stem(x)))
        x = torch.relu(self.biased(x))
        x = F.relu(self.pre_bn(x))
        y = self.down_bn(self.down(x)) + self.proj_bn(self.proj(x))
        y = F.relu(y)
        z = F.relu(self.grouped_bn(self.grouped(y)))
        w = self.same(z)
        w = F.relu(self.same_bn(w) + y) + F.relu(self.same_bn(w) + self.channel_bias)
        return self.fc(F.adaptive_avg_pool2d(w, 1).flatten(1))


def toy(num_classes: int = 10) -> nn.Module:
    return Toy(num_classes)


def build(arch: str, seed: int = 0) -> external.ConvertedModel:
    torch.manual_seed(seed)
    if arch == "toy":
        return randomized(external.convert_plain(toy(), "toy", 10, 8), seed, removed_fraction=0.4)
    return randomized(external.build(arch, 10, 32), seed, removed_fraction=0.4)


@pytest.fixture
def reference_kernel(monkeypatch) -> list:
    """The reference op as the fused kernel; the list it returns grows by one per fused call."""
    calls = []

    def conv_bn_act(*args, **kwargs):
        calls.append(1)
        return reference.conv_bn_act(*args, **kwargs)

    monkeypatch.setattr(fused_forward, "_conv_bn_act", lambda: conv_bn_act)
    return calls


def fused_steps(model: external.ConvertedModel):
    fused_graph.fused_stages(model.net, reference.conv_bn_act)
    return fused_graph._FUSED[model.net].steps


def test_the_toy_folds_what_the_op_computes_and_leaves_the_rest():
    model = build("toy")
    steps = fused_steps(model)
    conv_steps = [s for s in steps if isinstance(s, fused_graph.FusedConvStep)]
    act_steps = [s for s in steps if isinstance(s, fused_graph.FusedScaleShiftSite)]
    net = model.net
    assert {s.conv for s in conv_steps} == {net.stem, net.biased, net.down, net.proj}
    assert [s.bn for s in act_steps] == [net.pre_bn, net.grouped_bn]  # the grouped conv's BN -> ReLU still folds
    by_conv = {s.conv: s for s in conv_steps}
    assert by_conv[net.biased].bn is None and by_conv[net.biased].site is not None
    assert by_conv[net.proj].site is None  # the projection is the residual of the down conv's step
    assert by_conv[net.down].site is not None
    # grouped: not foldable; same: its BN output feeds two adds, so nothing after the conv folds
    assert net.grouped not in by_conv and net.same not in by_conv


@pytest.mark.parametrize("arch", ["toy", "torchvision:resnet18", "torchvision:resnet50", "torchvision:vgg11_bn",
                                  "torchvision:densenet121", "torchvision:regnet_x_400mf"])
def test_fused_stages_compute_the_model(arch):
    model = build(arch)
    stages = fused_graph.fused_stages(model.net, reference.conv_bn_act)
    x = torch.randn(3, 3, *(2 * [model.fastmask_spec["image_size"]]))
    with torch.no_grad():
        y = x
        for stage in stages:
            y = stage(y)
        expected = model(x)
        staged = model.stem(x)  # the model's own stages too (the toy reads a parameter inside its graph)
        for block in model.blocks:
            staged = block(staged)
        torch.testing.assert_close(model.head(staged), expected, rtol=0, atol=0)
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
    sites = {id(site) for _, site in fm.masked_sites(model) if len(site.shape) == 3}
    folded = {id(step.site) for step in fused_graph._FUSED[model.net].steps if step.site is not None}
    if arch.startswith("torchvision:"):  # every conv-shaped site of these models sits at the end of a chain
        assert folded == sites


def plain_scores(model, candidates, images, labels):
    """Each candidate alone on the model, one plain forward."""
    masks = fm.MaskSet(model)
    saved = masks.snapshot()
    correct, loss = [], []
    for candidate in candidates:
        masks.remove(candidate)
        with torch.no_grad():
            logits = model(images)
        masks.restore(saved)
        correct.append(int((logits.argmax(1) == labels).sum()))
        loss.append(float(F.cross_entropy(logits, labels)))
    return torch.tensor(correct), torch.tensor(loss, dtype=torch.float64)


def candidates_of(model, k: int, size: int, seed: int = 1):
    masks = fm.MaskSet(model)
    generator = torch.Generator().manual_seed(seed)
    present = masks.present()
    return [present[torch.randperm(present.numel(), generator=generator)[:size]].sort().values for _ in range(k)]


@pytest.mark.parametrize("arch", ["toy", "torchvision:resnet18", "torchvision:vgg11_bn", "torchvision:densenet121"])
def test_fused_scoring_matches_each_candidate_alone(arch, reference_kernel):
    model = build(arch)
    size = model.fastmask_spec["image_size"]
    generator = torch.Generator().manual_seed(3)
    images, labels = torch.randn(6, 3, size, size, generator=generator), torch.randint(0, 10, (6,), generator=generator)
    candidates = candidates_of(model, 4, size=200)
    scores = score_hypotheses(model, candidates, images, labels, fused=True, chunk_size=3, batch_size=4)
    assert reference_kernel, "the fused chains must have run"
    correct, loss = plain_scores(model, candidates, images, labels)
    assert torch.equal(scores.correct, correct)
    torch.testing.assert_close(scores.loss, loss, rtol=1e-4, atol=1e-5)
    assert score_current(model, images, labels, fused=True) == pytest.approx(
        score_current(model, images, labels, fused=False), rel=1e-5)


def test_fused_scoring_follows_weights_changed_between_calls(reference_kernel):
    """The rewrite is kept per model; the folding is redone on every call (finetuning changes BN and conv weights)."""
    model = build("toy")
    images, labels = torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))
    score_current(model, images, labels, fused=True)
    with torch.no_grad():
        model.net.stem_bn.running_mean.add_(0.7)
        model.net.biased.bias.mul_(-2.0)
        model.net.pre_bn.weight.mul_(1.5)
    assert score_current(model, images, labels, fused=True) == pytest.approx(
        score_current(model, images, labels, fused=False), rel=1e-5)


def test_polynomial_sites_through_the_fused_chains(reference_kernel):
    torch.manual_seed(0)
    model = randomized(external.convert_plain(toy(), "toy", 10, 8, polynomial=True), 0, removed_fraction=0.4)
    generator = torch.Generator().manual_seed(2)
    for _, site in fm.masked_sites(model):
        if site.coeffs is not None:
            site.coeffs.data.copy_(torch.randn(site.coeffs.shape, generator=generator) * 0.3)
    assert any(site.coeffs is not None for _, site in fm.masked_sites(model))
    images, labels = torch.randn(6, 3, 8, 8, generator=generator), torch.randint(0, 10, (6,), generator=generator)
    candidates = candidates_of(model, 3, size=100)
    scores = score_hypotheses(model, candidates, images, labels, fused=True)
    correct, loss = plain_scores(model, candidates, images, labels)
    assert torch.equal(scores.correct, correct)
    torch.testing.assert_close(scores.loss, loss, rtol=1e-4, atol=1e-5)


# The oracle runs on the reference ops, the fused path on the interpreted Triton kernels (backends.forced() reads
# FASTMASK_BACKEND at every call).
_TRITON_SCRIPT = """
import os, sys
sys.path.insert(0, {repo!r})
sys.path.insert(0, {tests!r})
import torch
from test_fused_graph import build, candidates_of, plain_scores
from fastmask.ops import backends
from fastmask.search.scoring import score_hypotheses
model = build("toy")
images, labels = torch.randn(3, 3, 8, 8), torch.randint(0, 10, (3,))
candidates = candidates_of(model, 2, size=60)
os.environ["FASTMASK_BACKEND"] = "triton"
assert backends.select("cpu", has_ext_kernel=False) == "triton", "the Triton kernel must be the one under test"
scores = score_hypotheses(model, candidates, images, labels, fused=True)
os.environ["FASTMASK_BACKEND"] = "torch"
correct, loss = plain_scores(model, candidates, images, labels)
assert torch.equal(scores.correct, correct), (scores.correct, correct)
torch.testing.assert_close(scores.loss, loss, rtol=1e-4, atol=1e-5)
print("fused ok")
"""


def test_fused_converted_path_with_triton_kernel_interpreted():
    pytest.importorskip("triton")
    if not fused_forward.available():
        pytest.skip(f"fastmask.ops.conv_bn_act is not in this build ({fused_forward.unavailable_reason()})")
    run_with_interpreted_triton(_TRITON_SCRIPT.format(repo=str(REPO), tests=str(Path(__file__).parent)), "fused ok")
