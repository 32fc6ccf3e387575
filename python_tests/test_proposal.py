"""removal_costs against an independent gradient (SNL's alpha) and against true loss changes; propose's rule:
distinct, present-only, deterministic candidates from the cheap end, and the corner where k nears the present count."""
import copy
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import randomize_batchnorm

import fastmask as fm
from fastmask.config import BCDConfig
from fastmask.errors import FastmaskError
from fastmask.search.polynomial import fit_polynomial, make_polynomial
from fastmask.search.proposal import propose, removal_costs
from fastmask.search.scoring import score_current, score_hypotheses

# The run config's defaults for the informed proposal.
DEFAULTS = {"pool": BCDConfig.pool, "temperature": BCDConfig.temperature}

IMAGE = 8
CLASSES = 10


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads cost more than they give


def make_model(seed: int = 0, removed_fraction: float = 0.3) -> nn.Module:
    """A tiny ResNet18 with BN away from identity and a sharp head, 30% of its ReLUs already removed."""
    torch.manual_seed(seed)
    model = fm.models.create("resnet18", CLASSES, IMAGE, width=4)
    randomize_batchnorm(model, seed, head_scale=5.0)
    ms = fm.MaskSet(model)
    ms.remove(ms.sample(int(ms.total() * removed_fraction), torch.Generator().manual_seed(seed)))
    return model


def make_data(model: nn.Module, n: int = 64, seed: int = 0, spread: float = 1.0):
    """Random images labelled by the model itself, so removing ReLUs mostly hurts, as on a trained model. The head is
    first centred and scaled on these images (logits of std `spread` around zero), so labels vary across images; at
    spread 1 the mean CE is about 1.3, a model's train loss mid-search."""
    images = torch.randn(n, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(seed))
    model.eval()
    with torch.no_grad():
        features = torch.flatten(F.adaptive_avg_pool2d(model.blocks[-1](_body(model, images)), 1), 1)
        centred = features - features.mean(dim=0)
        weight = model.linear.weight
        weight.mul_(spread / (centred @ weight.T).std().clamp(min=1e-6))
        model.linear.bias.copy_(-(features.mean(dim=0) @ weight.T))
        labels = model(images).argmax(dim=1)
    return images, labels


def _body(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    x = model.stem(images)
    for block in model.blocks[:-1]:
        x = block(x)
    return x


def true_increases(model, groups, images, labels) -> list[float]:
    """Summed CE after removing each group minus before (score_hypotheses: checked against plain forwards)."""
    _, before = score_current(model, images, labels)
    after = score_hypotheses(model, groups, images, labels).loss
    return [float(a - before) * labels.numel() for a in after]


def true_sizes(model, groups, images, labels) -> list[float]:
    """Per group, the sum over images of the size of each image's CE change when the group is removed: what the
    absolute estimate estimates (plain eval-mode forwards, masks put back after each group)."""
    ms = fm.MaskSet(model)
    model.eval()
    with torch.no_grad():
        before = F.cross_entropy(model(images), labels, reduction="none")
        sizes = []
        for group in groups:
            saved = ms.snapshot()
            ms.remove(group)
            sizes.append(float((F.cross_entropy(model(images), labels, reduction="none") - before).abs().sum()))
            ms.restore(saved)
    return sizes


def spearman(a, b) -> float:
    def ranks(v):
        v = np.asarray(v, dtype=np.float64)
        order = np.argsort(v, kind="stable")
        r = np.empty(len(v))
        r[order] = np.arange(len(v))
        for value in np.unique(v):  # average ranks over ties
            r[v == value] = r[v == value].mean()
        return r
    return float(np.corrcoef(ranks(a), ranks(b))[0, 1])


# ---- removal_costs ---------------------------------------------------------------------------------------------
def minus_alpha_gradient(model, images, labels) -> tuple[torch.Tensor, torch.Tensor]:
    """(-dL_n/dalpha of SNL's relaxation alpha*relu(x) + (1-alpha)*x at every ReLU, per image n: [N, total]; the
    mask) on a copy of the model, alpha at the current mask: an autograd path through the reference op, independent
    of removal_costs."""
    oracle = copy.deepcopy(model).eval()
    ms = fm.MaskSet(oracle)
    for site in ms.sites:
        site.alpha = nn.Parameter(site.mask.float())
    per_image = []
    for n in range(labels.numel()):
        for site in ms.sites:
            site.alpha.grad = None
        F.cross_entropy(oracle(images[n:n + 1]), labels[n:n + 1], reduction="sum").backward()
        per_image.append(torch.cat([-site.alpha.grad.reshape(-1).double() for site in ms.sites]))
    return torch.stack(per_image), ms.flat()


def test_costs_are_the_summed_sizes_of_the_alpha_gradient():
    """With identity replacement image n's first-order effect is -dL_n/dalpha of SNL's relaxation alpha*relu(x) +
    (1-alpha)*x at the current mask: the cost is the sum over images of its size."""
    model = make_model()
    images, labels = make_data(model, 24)
    costs = removal_costs(model, images, labels, batch_size=10)
    per_image, present = minus_alpha_gradient(model, images, labels)
    expected = per_image.abs().sum(dim=0)
    assert costs.dtype == torch.float64 and costs.shape == (present.numel(),)
    assert torch.isinf(costs[~present]).all() and (costs[~present] > 0).all()
    assert torch.isfinite(costs[present]).all()
    torch.testing.assert_close(costs[present], expected[present], rtol=1e-4, atol=1e-5)
    # per-image effects of both signs exist: the size of the sum would be smaller
    assert (expected[present] > per_image.sum(dim=0)[present].abs() + 1e-6).any()


def test_costs_leave_the_model_as_it_was():
    model = make_model()
    images, labels = make_data(model, 16)
    model.train()
    model.layer1[0].bn1.eval()
    masks = fm.MaskSet(model).flat()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    costs = removal_costs(model, images, labels)
    assert model.training and not model.layer1[0].bn1.training and model.layer1[0].bn2.training
    assert torch.equal(fm.MaskSet(model).flat(), masks)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())  # BN statistics untouched
    assert all(p.grad is None for p in model.parameters())
    torch.testing.assert_close(removal_costs(model, images, labels, batch_size=5), costs, rtol=1e-3, atol=1e-4)


def test_identity_coefficients_cost_like_linearization():
    model = make_model()
    images, labels = make_data(model, 16)
    plain = removal_costs(model, images, labels)
    make_polynomial(model)  # coeffs (0, 1, 0): the identity
    present = torch.isfinite(plain)
    torch.testing.assert_close(removal_costs(model, images, labels)[present], plain[present])


@pytest.mark.parametrize("polynomial", [False, True])
def test_estimate_ranks_true_loss_changes(polynomial):
    """Spearman correlation of the summed estimate with the true summed size of the per-image loss changes over 40
    random single ReLUs and 40 random groups of 4, on the images the estimate came from, averaged over three models.
    A group's error grows with its size (the estimate is linear, removals interact), hence the lower bar for
    groups."""
    correlations = {1: [], 4: []}
    for seed in range(3):
        model = make_model(seed)
        images, labels = make_data(model, 64, seed)
        if polynomial:
            fit_polynomial(model, images)
        costs = removal_costs(model, images, labels)
        ms = fm.MaskSet(model)
        g = torch.Generator().manual_seed(3)
        for size, found in correlations.items():
            groups = [ms.sample(size, g) for _ in range(40)]
            estimate = [float(costs[group].sum()) for group in groups]
            truth = true_sizes(model, groups, images, labels)
            found.append(spearman(estimate, truth))
    print({size: [round(c, 2) for c in found] for size, found in correlations.items()})
    assert np.mean(correlations[1]) > 0.9, correlations
    assert np.mean(correlations[4]) > 0.8, correlations


@pytest.mark.parametrize("free_removed", [False, True])
def test_informed_candidates_cost_less_than_uniform_ones(free_removed):
    """Mean true loss rise of 16 informed vs 16 uniform candidates of 30 ReLUs, over three models; with free_removed
    the ReLUs whose inputs are never negative on the images (exactly free to remove) are gone first, as after SNL."""
    informed_rise, uniform_rise = [], []
    for seed in range(3):
        model = make_model(seed, removed_fraction=0.1)
        images, labels = make_data(model, 64, seed)
        ms = fm.MaskSet(model)
        if free_removed:
            costs = removal_costs(model, images, labels)
            ms.remove((costs == 0).nonzero().squeeze(1))
        costs = removal_costs(model, images, labels)
        informed = propose(costs, 30, 16, torch.Generator().manual_seed(0), **DEFAULTS)
        uniform = [ms.sample(30, torch.Generator().manual_seed(100 + i)) for i in range(16)]
        informed_rise.append(np.mean(true_increases(model, informed, images, labels)))
        uniform_rise.append(np.mean(true_increases(model, uniform, images, labels)))
    print({"informed": [round(r, 3) for r in informed_rise], "uniform": [round(r, 3) for r in uniform_rise]})
    assert np.mean(informed_rise) < 0.1 * np.mean(uniform_rise)
    assert all(i < u for i, u in zip(informed_rise, uniform_rise, strict=True))


# ---- propose ---------------------------------------------------------------------------------------------------
def costs_with_absent(n: int = 2000, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    costs = torch.randn(n, generator=g, dtype=torch.float64)
    costs[torch.rand(n, generator=g) < 0.4] = math.inf
    return costs


def test_candidates_are_distinct_sorted_present_and_from_the_pool():
    costs = costs_with_absent()
    k, rt, pool = 20, 12, 3.0
    candidates = propose(costs, k, rt, torch.Generator().manual_seed(0), pool=pool, temperature=BCDConfig.temperature)
    assert len(candidates) == rt
    assert len({tuple(c.tolist()) for c in candidates}) == rt
    cheapest = set(torch.sort(costs.abs()).indices[:math.ceil(pool * k)].tolist())
    for c in candidates:
        assert c.dtype == torch.int64 and c.device.type == "cpu" and c.numel() == k
        assert torch.equal(c, c.sort().values) and c.unique().numel() == k
        assert torch.isfinite(costs[c]).all()
        assert set(c.tolist()) <= cheapest


def test_a_pool_of_one_draws_the_cheapest():
    """pool=1 with one candidate removes the estimate's cheapest: the pool grows to k + 1 (so that two candidates
    could differ) and k of those go."""
    costs = costs_with_absent()
    k = 20
    cheapest = set(torch.sort(costs.abs()).indices[:k + 1].tolist())
    for seed in range(5):
        (candidate,) = propose(costs, k, 1, torch.Generator().manual_seed(seed), pool=1.0, temperature=0.5)
        assert candidate.numel() == k and set(candidate.tolist()) <= cheapest


def test_deterministic_given_the_generator():
    costs = costs_with_absent()
    first = propose(costs, 15, 10, torch.Generator().manual_seed(7), **DEFAULTS)
    again = propose(costs, 15, 10, torch.Generator().manual_seed(7), **DEFAULTS)
    other = propose(costs, 15, 10, torch.Generator().manual_seed(8), **DEFAULTS)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert any(not torch.equal(a, b) for a, b in zip(first, other, strict=True))


def test_temperature_trades_cost_for_spread():
    costs = costs_with_absent()
    cold = propose(costs, 20, 10, torch.Generator().manual_seed(0), pool=BCDConfig.pool, temperature=0.05)
    hot = propose(costs, 20, 10, torch.Generator().manual_seed(0), pool=BCDConfig.pool, temperature=math.inf)
    uniform_pool = propose(costs, 20, 10, torch.Generator().manual_seed(0), pool=50.0, temperature=math.inf)
    mean_cost = [np.mean([float(costs[c].abs().sum()) for c in cands]) for cands in (cold, hot, uniform_pool)]
    assert mean_cost[0] < mean_cost[1] < mean_cost[2]
    assert len({i for c in hot for i in c.tolist()}) > len({i for c in cold for i in c.tolist()})


def test_ties_are_broken_at_random_not_by_position():
    costs = torch.zeros(1000, dtype=torch.float64)  # every ReLU costs the same
    chosen = torch.cat(propose(costs, 10, 5, torch.Generator().manual_seed(0), **DEFAULTS))
    assert chosen.float().mean() > 200  # not the first 40 positions


def test_large_negative_estimates_are_not_preferred():
    """The cheap end is the smallest estimated change: strongly negative estimates (large perturbations, where the
    linear estimate is least trustworthy) are avoided like strongly positive ones."""
    costs = torch.zeros(300, dtype=torch.float64)
    costs[:100] = -50.0
    costs[100:200] = 50.0
    chosen = torch.cat(propose(costs, 10, 8, torch.Generator().manual_seed(0), **DEFAULTS))
    assert (chosen >= 200).all()


@pytest.mark.parametrize("k, rt, expected", [(7, 10, 1), (6, 10, 7), (1, 10, 7), (5, 10, 10), (3, 50, 35)])
def test_k_close_to_the_present_count(k, rt, expected):
    costs = torch.full((30,), math.inf, dtype=torch.float64)
    present = torch.tensor([1, 4, 5, 9, 17, 22, 29])
    costs[present] = torch.arange(7, dtype=torch.float64)
    candidates = propose(costs, k, rt, torch.Generator().manual_seed(0), **DEFAULTS)
    assert len(candidates) == expected == min(rt, math.comb(7, k))
    assert len({tuple(c.tolist()) for c in candidates}) == expected
    assert all(set(c.tolist()) <= set(present.tolist()) and c.numel() == k for c in candidates)
    if expected < rt:  # all subsets listed: cheapest total first
        totals = [float(costs[c].sum()) for c in candidates]
        assert totals == sorted(totals)


def test_large_k_still_gives_distinct_candidates():
    costs = torch.randn(500, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    candidates = propose(costs, 495, 40, torch.Generator().manual_seed(0), **DEFAULTS)
    assert len({tuple(c.tolist()) for c in candidates}) == 40


def test_bad_arguments():
    costs = costs_with_absent(100)
    present = int(torch.isfinite(costs).sum())
    g = torch.Generator().manual_seed(0)
    with pytest.raises(FastmaskError, match="present"):
        propose(costs, present + 1, 3, g, **DEFAULTS)
    for kwargs in ({"temperature": 0.0}, {"pool": 0.5}):
        with pytest.raises(FastmaskError):
            propose(costs, 3, 3, g, **{**DEFAULTS, **kwargs})
    with pytest.raises(FastmaskError):
        propose(costs, 0, 3, g, **DEFAULTS)
    nan = costs.clone()
    nan[0] = math.nan
    with pytest.raises(FastmaskError, match="NaN"):
        propose(nan, 3, 3, g, **DEFAULTS)
