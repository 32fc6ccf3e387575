"""SNL (fastmask/search/snl.py) on a tiny ResNet18 (width 4, 7,680 ReLUs) and a slice of the digits data.

SNL's lambda0 of 1e-5 and lr of 1e-3 would need hundreds of steps to move an alpha; the tests use a large lr and
lambda so the count falls within a few epochs.
"""
import contextlib
import dataclasses

import pytest
import torch

import fastmask as fm
from fastmask import FastmaskError, data
from fastmask.config import SNLConfig
from fastmask.search import polynomial, snl
from fastmask.train import finetune_config


@pytest.fixture(scope="module")
def small():
    digits = data.load_dataset("digits")
    return dataclasses.replace(digits, train_x=digits.train_x[:256], train_y=digits.train_y[:256])


def tiny_model(dataset, seed=0):
    torch.manual_seed(seed)
    return fm.models.create("resnet18", dataset.num_classes, dataset.image_size, width=4,
                            in_channels=dataset.in_channels)


def remove_some(model, count, seed=0):
    masks = fm.MaskSet(model)
    masks.remove(masks.sample(count, torch.Generator().manual_seed(seed)))
    return masks, ~masks.flat()


def test_reaches_exactly_the_budget_and_keeps_absent_relus_absent(small):
    model, teacher = tiny_model(small), tiny_model(small, seed=1)
    masks, absent = remove_some(model, 3000)
    leaks = []

    def check_absent_alphas(epoch, row, trained):
        if row["phase"] == "snl":
            alphas = torch.cat([site.alpha.detach().reshape(-1) for site in masks.sites])
            leaks.append(int((alphas[absent] != 0).sum()))

    config = SNLConfig(lr=0.05, lambda0=1.0, epochs=15)
    result = snl.run_snl(model, small, 1234, config, "cpu", finetune=finetune_config("resnet18", 1), teacher=teacher,
                         progress=False, on_epoch=check_absent_alphas)
    assert result["reached_budget"] and result["stop_reason"] == "budget reached"
    assert result["start_count"] == 7680 - 3000
    assert masks.count() == 1234 == result["relu_count"] == fm.relu_count(model)
    assert not (masks.flat() & absent).any()  # nothing that was absent came back
    assert leaks and all(n == 0 for n in leaks)
    counts = [row["relu_count"] for row in result["history"]]
    assert counts[-1] <= 1234 < counts[0] and counts[-1] == result["soft_count_at_stop"]
    assert len(result["finetune_history"]) == 1 and result["finetune_history"][0]["phase"] == "finetune"
    # the alphas are gone: binary masks drive the model again, and nothing about them is saved
    assert all(site.alpha is None for site in masks.sites)
    assert not any("alpha" in name for name in model.state_dict())
    assert not any("alpha" in name for name, _ in model.named_parameters())


def test_budget_not_reached_binarizes_anyway_and_lambda_grows_on_stalls(small):
    tiny = dataclasses.replace(small, train_x=small.train_x[:128], train_y=small.train_y[:128])
    model = tiny_model(tiny)
    config = SNLConfig(lr=1e-6, lambda0=1e-3, epochs=4, stall_patience=2)
    result = snl.run_snl(model, tiny, 500, config, "cpu", progress=False)
    assert not result["reached_budget"] and "max_epochs" in result["stop_reason"]
    assert fm.relu_count(model) == 500
    # the count never falls, so lambda grows after every epoch from 0-based epoch 2 on (SNL's rule)
    lambdas = [row["lambda"] for row in result["history"]]
    assert lambdas == pytest.approx([1e-3, 1e-3, 1e-3, 1.1e-3])
    assert result["final_lambda"] == pytest.approx(1.21e-3)
    assert result["finetune_history"] == []


@contextlib.contextmanager
def alphas_all_at(small, value: float):
    """(MaskSet, alphas) of a fresh tiny model with every alpha set to value."""
    masks = fm.MaskSet(tiny_model(small))
    with masks.alphas() as alphas:
        with torch.no_grad():
            for alpha in alphas:
                alpha.fill_(value)
        yield masks, alphas


def test_binarize_keeps_top_alphas_among_present(small):
    with alphas_all_at(small, 0.5) as (masks, alphas):
        # site 0: a large alpha at an absent position must lose to small ones at present positions
        site0 = masks.sites[0]
        site0.mask.view(-1)[0] = False
        with torch.no_grad():
            alphas[0].view(-1)[0] = 9.0
            alphas[0].view(-1)[1] = 3.0
            alphas[1].view(-1)[2] = 2.0
            alphas[0].view(-1)[3] = -1.0
        snl.binarize(masks, 4)
        kept = masks.present().tolist()
    # 3.0 and 2.0 first, then ties at 0.5 go to the lowest flat indices (2 and 4; 0 is absent, 3 is -1)
    assert kept == sorted([1, masks.offsets[1] + 2, 2, 4])


def test_soft_count_uses_threshold_and_presence(small):
    with alphas_all_at(small, 0.005) as (masks, alphas):
        with torch.no_grad():
            alphas[2].view(-1)[:10] = 0.5
        masks.sites[2].mask.view(-1)[:3] = False
        assert snl.soft_count(masks, threshold=1e-2) == 7
        assert snl.soft_count(masks, threshold=1e-3) == masks.count()


def test_absent_alpha_gradient_is_masked(small):
    model = tiny_model(small)
    masks, absent = remove_some(model, 100)
    with masks.alphas() as alphas:
        images = data.normalize(small.train_x[:8], small, "cpu")
        loss = torch.nn.functional.cross_entropy(model(images), small.train_y[:8]) + sum(a.sum() for a in alphas)
        loss.backward()
    grads = torch.cat([a.grad.reshape(-1) for a in alphas])
    assert (grads[absent] == 0).all() and (grads[~absent] != 0).any()
    assert (torch.cat([a.detach().reshape(-1) for a in alphas])[absent] == 0).all()


def test_alpha_phase_trains_the_polynomial_replacement(small):
    """With coeffs, the relaxation is alpha * relu(x) + (1 - alpha) * poly(x): its gradient reaches the coeffs."""
    model = tiny_model(small)
    polynomial.make_polynomial(model)
    masks, _ = remove_some(model, 100)
    with masks.alphas() as alphas:
        with torch.no_grad():
            for alpha in alphas:
                alpha.mul_(0.5)
        images = data.normalize(small.train_x[:8], small, "cpu")
        torch.nn.functional.cross_entropy(model(images), small.train_y[:8]).backward()
    poly = [site for site in masks.sites if site.coeffs is not None]
    assert poly and all(site.coeffs.grad is not None and site.coeffs.grad.abs().sum() > 0 for site in poly)


def test_bad_budgets(small):
    model = tiny_model(small)
    with pytest.raises(FastmaskError, match="not below"):
        snl.run_snl(model, small, 7680, SNLConfig(), "cpu", progress=False)
    with pytest.raises(FastmaskError, match="budget must be >= 0"):
        snl.run_snl(model, small, -1, SNLConfig(), "cpu", progress=False)
    with pytest.raises(FastmaskError, match="max_epochs"):
        snl.run_snl(model, small, 10, SNLConfig(), "cpu", max_epochs=0, progress=False)
    assert all(site.alpha is None for _, site in fm.masked_sites(model))


def test_defaults_follow_snl():
    config = SNLConfig()
    assert (config.lr, config.lambda0, config.lambda_growth, config.threshold, config.stall_patience,
            config.finetune_epochs) == (1e-3, 1e-5, 1.1, 1e-2, 5, 100)
