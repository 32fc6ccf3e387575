"""make_polynomial and fit_polynomial: identity start, least squares equal to numpy.polyfit per channel, singular
channels, the fit's error against the identity's, state left behind, and the checkpoint round trip."""
import numpy as np
import pytest
import torch
import torch.nn as nn

import fastmask as fm
from fastmask.checkpoint import load_model, save_model
from fastmask.errors import FastmaskError
from fastmask.nn import MaskedReLU
from fastmask.search.polynomial import fit_polynomial, make_polynomial

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads cost more than they give


def site_inputs(n: int = 40, seed: int = 0) -> torch.Tensor:
    """[n, 4, 3, 3] inputs whose channels differ in centre and scale (one far from unit size)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, 3, 3, generator=g)
    centre = torch.tensor([0.0, 1.0, -0.5, 30.0]).view(1, 4, 1, 1)
    scale = torch.tensor([1.0, 0.5, 2.0, 40.0]).view(1, 4, 1, 1)
    return x * scale + centre


def polyfit(values: np.ndarray) -> np.ndarray:
    return np.polyfit(values, np.maximum(values, 0.0), 2)[::-1]  # (c0, c1, c2)


def test_fit_matches_numpy_polyfit_per_channel():
    model = nn.Sequential(MaskedReLU((4, 3, 3)))
    x = site_inputs()
    report = fit_polynomial(model, x, batch_size=7)  # batches of 7: the moments must add up across batches
    coeffs = model[0].coeffs.detach().double().numpy()
    for c in range(4):
        expected = polyfit(x[:, c].reshape(-1).double().numpy())
        np.testing.assert_allclose(coeffs[c], expected, rtol=1e-4, atol=1e-5 * max(1.0, np.abs(expected).max()))
    assert report[0]["fallback"] == 0 and report[0]["channels"] == 4


def test_fit_on_a_flat_site_and_singular_channels():
    """[N, D] inputs fit per feature; a constant feature, and one with only two distinct values, keep the identity."""
    model = nn.Sequential(MaskedReLU((5,)))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(30, 5, generator=g)
    x[:, 1] = 0.7
    x[:, 3] = torch.where(torch.arange(30) % 2 == 0, -1.0, 2.0)
    report = fit_polynomial(model, x)
    coeffs = model[0].coeffs.detach().double()
    for d in (0, 2, 4):
        np.testing.assert_allclose(coeffs[d].numpy(), polyfit(x[:, d].double().numpy()), rtol=1e-4, atol=1e-5)
    for d in (1, 3):
        assert coeffs[d].tolist() == [0.0, 1.0, 0.0]
    assert report[0]["fallback"] == 2


def test_fit_beats_the_identity_and_reports_true_errors():
    model = nn.Sequential(MaskedReLU((4, 3, 3)))
    x = site_inputs(seed=2)
    report = fit_polynomial(model, x)[0]
    model[0].mask.zero_()  # every position replaced: the model now computes the polynomial
    with torch.no_grad():
        fitted = model(x).double()
    relu = torch.relu(x).double()
    per_channel_fit = ((fitted - relu) ** 2).mean(dim=(0, 2, 3))
    per_channel_identity = ((x.double() - relu) ** 2).mean(dim=(0, 2, 3))
    assert (per_channel_fit < per_channel_identity).all()
    assert report["mse_fit"] < report["mse_identity"]
    np.testing.assert_allclose(report["mse_fit"], float(per_channel_fit.mean()), rtol=1e-3)
    np.testing.assert_allclose(report["mse_identity"], float(per_channel_identity.mean()), rtol=1e-6)


def test_make_polynomial_starts_at_the_identity():
    torch.manual_seed(0)
    model = fm.models.create("resnet18", 10, 8, width=4)
    ms = fm.MaskSet(model)
    ms.remove(ms.sample(ms.total() // 2, torch.Generator().manual_seed(0)))
    x = torch.randn(6, 3, 8, 8)
    model.eval()
    with torch.no_grad():
        before = model(x)
    assert make_polynomial(model) is model
    assert model.fastmask_spec["polynomial"] is True
    poly = [site for site in ms.sites if site.coeffs is not None]
    # the ReLU after bn1 of every block takes one; the one after the residual add keeps the identity
    assert [name.endswith("relu1") for name in ms.names] == [site.coeffs is not None for site in ms.sites]
    assert len(poly) == 8 and all(site.normalized_input for site in poly)
    for site in poly:
        assert isinstance(site.coeffs, nn.Parameter) and site.coeffs.shape == (site.shape[0], 3)
        assert site.coeffs.device == site.mask.device and site.coeffs.dtype == torch.float32
        assert torch.equal(site.coeffs, torch.tensor([[0.0, 1.0, 0.0]]).repeat(site.shape[0], 1))
    assert {id(site.coeffs) for site in poly} <= {id(p) for p in model.parameters()}
    with torch.no_grad():
        torch.testing.assert_close(model(x), before)
    kept = [site.coeffs for site in ms.sites]
    make_polynomial(model)  # existing coefficients are left alone
    assert all(site.coeffs is c for site, c in zip(ms.sites, kept, strict=True))
    plain = make_polynomial(nn.Sequential(MaskedReLU((2, 2, 2))))  # no spec: nothing to mark
    assert plain[0].coeffs is not None and not hasattr(plain, "fastmask_spec")


def test_fit_leaves_flags_and_masks_and_round_trips(tmp_path):
    torch.manual_seed(0)
    model = fm.models.create("resnet18", 10, 8, width=4)
    ms = fm.MaskSet(model)
    ms.remove(ms.sample(ms.total() // 3, torch.Generator().manual_seed(1)))
    masks = ms.flat()
    model.train()
    x = torch.randn(20, 3, 8, 8)
    running = model.bn1.running_mean.clone()
    report = fit_polynomial(model, x, batch_size=8)
    assert model.training and torch.equal(ms.flat(), masks)
    assert torch.equal(model.bn1.running_mean, running)  # eval mode: BN statistics untouched
    poly = [(name, site) for name, site in zip(ms.names, ms.sites, strict=True) if site.coeffs is not None]
    assert [r["site"] for r in report] == [name for name, _ in poly] and len(poly) == 8
    assert all(r["mse_fit"] <= r["mse_identity"] + 1e-12 for r in report)
    assert all(not torch.equal(site.coeffs, torch.tensor([[0.0, 1.0, 0.0]]).repeat(site.shape[0], 1))
               for _, site in poly)
    save_model(model, tmp_path / "poly.safetensors")
    loaded = load_model(tmp_path / "poly.safetensors")
    assert loaded.fastmask_spec["polynomial"] is True
    for site, other in zip(ms.sites, fm.MaskSet(loaded).sites, strict=True):
        assert torch.equal(site.mask, other.mask)
        assert (site.coeffs is None and other.coeffs is None) or torch.equal(site.coeffs, other.coeffs)
    model.eval()
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


def test_a_checkpoint_with_coefficients_after_the_residual_add_loads_them(tmp_path):
    """Checkpoints written when every site took a polynomial load with every site's coefficients."""
    torch.manual_seed(0)
    model = make_polynomial(fm.models.create("resnet18", 10, 8, width=4))
    site = model.layer2[1].relu2
    site.coeffs = nn.Parameter(torch.tensor([[0.1, 0.9, 0.05]]).repeat(site.shape[0], 1))
    fm.MaskSet(model).remove(fm.MaskSet(model).sample(600, torch.Generator().manual_seed(0)))
    save_model(model, tmp_path / "old.safetensors")
    loaded = load_model(tmp_path / "old.safetensors")
    assert torch.equal(loaded.layer2[1].relu2.coeffs, site.coeffs) and loaded.layer2[0].relu2.coeffs is None
    x = torch.randn(4, 3, 8, 8)
    model.eval()
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


def test_convert_gives_a_polynomial_only_after_a_batchnorm():
    torchvision = pytest.importorskip("torchvision")
    converted = fm.nn.convert(torchvision.models.resnet18(num_classes=10), torch.randn(1, 3, 32, 32),
                              polynomial=True)
    sites = [site for _, site in fm.masked_sites(converted)]
    # the stem's ReLU and each block's first follow a BatchNorm; each block's second follows the residual add
    assert [site.normalized_input for site in sites] == [True] + [True, False] * 8
    assert all((site.coeffs is not None) == site.normalized_input for site in sites)


def test_bad_arguments():
    model = nn.Sequential(MaskedReLU((2, 2, 2)))
    with pytest.raises(FastmaskError, match="image"):
        fit_polynomial(model, torch.empty(0, 2, 2, 2))
    with pytest.raises(FastmaskError, match="batch_size"):
        fit_polynomial(model, torch.randn(3, 2, 2, 2), batch_size=0)
