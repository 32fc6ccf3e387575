"""MaskSet: flat indexing, sampling, candidates, alphas and files."""
import json

import pytest
import torch

import fastmask as fm
from fastmask.errors import FastmaskError


@pytest.fixture
def model():
    return fm.models.create("resnet18", 10, 8, width=4)


def test_flat_index_round_trip(model):
    ms = fm.MaskSet(model)
    g = torch.Generator().manual_seed(0)
    for flat in torch.randint(0, ms.total(), (50,), generator=g).tolist() + [0, ms.total() - 1]:
        site, pos = ms.locate(flat)
        assert ms.flat_index(site, pos) == flat
        assert int(ms.site_of(torch.tensor([flat]))[0]) == site
    with pytest.raises(IndexError):
        ms.locate(ms.total())


def test_flat_order_is_sites_then_row_major(model):
    ms = fm.MaskSet(model)
    site, pos = 3, (1, 2, 0)
    flat = ms.flat_index(site, pos)
    mask = ms.flat()
    mask[flat] = False
    ms.set_flat(mask)
    assert not ms.sites[site].mask[pos]
    assert ms.count() == ms.total() - 1


def test_sample_is_deterministic_distinct_and_only_present(model):
    ms = fm.MaskSet(model)
    ms.remove(torch.arange(0, ms.total(), 2))
    a = ms.sample(100, torch.Generator().manual_seed(5))
    b = ms.sample(100, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    assert a.unique().numel() == 100
    assert bool(ms.flat()[a].all())
    with pytest.raises(FastmaskError):
        ms.sample(ms.count() + 1, torch.Generator())


def test_remove_and_counts(model):
    ms = fm.MaskSet(model)
    before = ms.count()
    idx = ms.sample(37, torch.Generator().manual_seed(1))
    ms.remove(idx)
    assert ms.count() == before - 37
    assert sum(s["kept"] for s in ms.per_site()) == ms.count()


def test_candidate_masks_and_first_site(model):
    ms = fm.MaskSet(model)
    late = torch.tensor([ms.offsets[10] + 3, ms.offsets[12]])
    early = torch.tensor([ms.offsets[2] + 1])
    masks = ms.candidate_masks([late, early])
    assert len(masks) == len(ms.sites)
    assert masks[10].shape == (2, *ms.sites[10].shape)
    assert not masks[10][0].reshape(-1)[3] and masks[10][1].reshape(-1)[3]
    assert not masks[2][1].reshape(-1)[1] and masks[2][0].all()
    assert ms.first_site_touched([late]) == 10
    assert ms.first_site_touched([late, early]) == 2
    assert ms.count() == ms.total()  # building candidates changes nothing


def test_snapshot_restore(model):
    ms = fm.MaskSet(model)
    snap = ms.snapshot()
    ms.remove(torch.arange(10))
    ms.restore(snap)
    assert ms.count() == ms.total()


def test_save_load_safetensors_and_summary(model, tmp_path):
    ms = fm.MaskSet(model)
    ms.remove(ms.sample(500, torch.Generator().manual_seed(2)))
    path = tmp_path / "masks.safetensors"
    ms.save(path)
    summary = json.loads((tmp_path / "masks.safetensors.json").read_text())
    assert summary["relu_count"] == ms.count()
    other = fm.models.create("resnet18", 10, 8, width=4)
    fm.MaskSet(other).load(path)
    assert torch.equal(fm.MaskSet(other).flat(), ms.flat())


def test_loading_masks_of_another_arch_fails_clearly(model, tmp_path):
    path = tmp_path / "m.safetensors"
    fm.MaskSet(model).save(path)
    wrn = fm.models.create("wide_resnet22_8", 10, 8, width=4)
    with pytest.raises(FastmaskError, match="another architecture"):
        fm.MaskSet(wrn).load(path)
    wider = fm.models.create("resnet18", 10, 8, width=8)
    with pytest.raises(FastmaskError, match="another architecture"):
        fm.MaskSet(wider).load(path)


# ---- transient search state --------------------------------------------------------------------------------------
def test_hypotheses_are_set_inside_the_block_and_restored_after(model):
    ms = fm.MaskSet(model)
    masks = ms.candidate_masks([torch.tensor([ms.offsets[3]]), torch.tensor([ms.offsets[3] + 1])])
    per_site = [masks[s] if s == 3 else None for s in range(len(ms.sites))]
    with ms.hypotheses(per_site):
        assert ms.sites[3].hypotheses is masks[3]
        assert ms.sites[3].active_mask().shape == (2, *ms.sites[3].shape)
        assert all(site.hypotheses is None for s, site in enumerate(ms.sites) if s != 3)
        assert ms.sites[0].active_mask().shape == (1, *ms.sites[0].shape)  # its own mask, for every group
    assert all(site.hypotheses is None for site in ms.sites)
    with pytest.raises(RuntimeError, match="boom"):
        with ms.hypotheses(per_site):
            raise RuntimeError("boom")
    assert all(site.hypotheses is None for site in ms.sites)


def test_hypotheses_are_checked(model):
    ms = fm.MaskSet(model)
    none = [None] * len(ms.sites)
    with pytest.raises(FastmaskError, match="entries"):
        with ms.hypotheses(none[:-1]):
            pass
    wrong_shape = list(none)
    wrong_shape[0] = torch.ones(2, 1, 2, 3, dtype=torch.bool)
    with pytest.raises(FastmaskError, match="shape"):
        with ms.hypotheses(wrong_shape):
            pass
    two_sizes = list(none)
    two_sizes[0] = torch.ones(2, *ms.sites[0].shape, dtype=torch.bool)
    two_sizes[1] = torch.ones(3, *ms.sites[1].shape, dtype=torch.bool)
    with pytest.raises(FastmaskError, match="same number"):
        with ms.hypotheses(two_sizes):
            pass
    assert all(site.hypotheses is None for site in ms.sites)


def test_alphas_are_one_where_present_zero_and_frozen_where_absent(model):
    ms = fm.MaskSet(model)
    ms.remove(ms.sample(300, torch.Generator().manual_seed(3)))
    present = ms.flat()
    with ms.alphas() as alphas:
        assert len(alphas) == len(ms.sites) and ms.carries_alphas()
        assert all(site.alpha is alpha for site, alpha in zip(ms.sites, alphas))
        flat = torch.cat([alpha.detach().reshape(-1) for alpha in alphas])
        assert torch.equal(flat, present.float())
        model(torch.randn(2, 3, 8, 8)).sum().backward()
        grads = torch.cat([alpha.grad.reshape(-1) for alpha in alphas])
        assert torch.all(grads[~present] == 0) and grads[present].abs().sum() > 0
        with pytest.raises(FastmaskError, match="already carry alphas"):
            with ms.alphas():
                pass
        assert ms.carries_alphas()  # the refused inner block left the outer alphas alone
    assert not ms.carries_alphas()
    with pytest.raises(RuntimeError, match="boom"):
        with ms.alphas():
            raise RuntimeError("boom")
    assert not ms.carries_alphas()
    assert not any("alpha" in name for name in model.state_dict())


