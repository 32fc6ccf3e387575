"""Models follow SNL's ReLU-counting convention, so budgets compare with the literature."""
import pytest
import torch

import fastmask as fm
from fastmask.errors import FastmaskError

SNL_COUNTS = [
    ("resnet18", 32, 491_520),
    ("wide_resnet22_8", 32, 1_359_872),
    ("resnet18", 64, 1_966_080),
    ("wide_resnet22_8", 64, 5_439_488),
]


@pytest.mark.parametrize("arch,size,expected", SNL_COUNTS)
def test_relu_count_matches_snl(arch, size, expected):
    model = fm.models.create(arch, num_classes=100, image_size=size)
    assert fm.relu_count(model) == expected
    assert fm.MaskSet(model).total() == expected


@pytest.mark.parametrize("arch,sites", [("resnet18", 16), ("wide_resnet22_8", 18)])
@pytest.mark.parametrize("width", [4, 8])
def test_narrow_models_run_and_site_shapes_match_activations(arch, sites, width):
    model = fm.models.create(arch, num_classes=7, image_size=16, width=width).eval()
    seen = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: seen.append((mod, tuple(out.shape[1:]))))
             for _, m in fm.masked_sites(model)]
    out = model(torch.randn(2, 3, 16, 16))
    for h in hooks:
        h.remove()
    assert out.shape == (2, 7)
    assert len(seen) == sites
    # forward order == registration order, and every site's mask has its activation's shape
    assert [m for m, _ in seen] == [m for _, m in fm.masked_sites(model)]
    assert all(m.shape == shape for m, shape in seen)


def test_resnet18_has_no_stem_relu():
    model = fm.models.create("resnet18", 10, 32, width=8)
    first_name, first = fm.masked_sites(model)[0]
    assert first_name == "layer1.0.relu1"


def test_stem_in_blocks_head_equals_forward():
    for arch in ("resnet18", "wide_resnet22_8"):
        model = fm.models.create(arch, 10, 16, width=4).eval()
        x = torch.randn(3, 3, 16, 16)
        out = model.stem(x)
        for block in model.blocks:
            out = block(out)
        torch.testing.assert_close(model.head(out), model(x))


def test_masking_everything_linearizes_the_network():
    model = fm.models.create("resnet18", 10, 8, width=4).eval()
    ms = fm.MaskSet(model)
    ms.set_flat(torch.zeros(ms.total(), dtype=torch.bool))
    assert fm.relu_count(model) == 0
    x = torch.randn(2, 3, 8, 8)
    # a linear network: f(2x) - f(0) == 2 (f(x) - f(0))
    zero = model(torch.zeros_like(x))
    torch.testing.assert_close(model(2 * x) - zero, 2 * (model(x) - zero), atol=1e-4, rtol=1e-4)


def test_bad_arch_and_sizes_are_clear_errors():
    with pytest.raises(FastmaskError, match="unknown arch"):
        fm.models.create("vgg16", 10, 32)
    with pytest.raises(FastmaskError):
        fm.models.create("resnet18", 1, 32)


@pytest.mark.parametrize("arch", ["resnet18", "wide_resnet22_8"])
@pytest.mark.parametrize("polynomial", [False, True])
def test_folded_blocks_compute_what_the_blocks_do(arch, polynomial, monkeypatch):
    """Every block's fold(), run by the fused path (with the reference op standing in for the kernel), gives the
    block's own eval-mode output: BN statistics and affine, shortcuts, residuals and masks all in their places."""
    from fastmask.ops import reference
    from fastmask.search import fused_forward

    monkeypatch.setattr(fused_forward, "_conv_bn_act", lambda: reference.conv_bn_act)
    torch.manual_seed(0)
    model = fm.models.create(arch, 10, 8, width=4, polynomial=polynomial).eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.3, 0.3)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.3, 0.3)
    ms = fm.MaskSet(model)
    ms.remove(ms.sample(ms.total() // 2, torch.Generator().manual_seed(0)))
    for _, site in fm.masked_sites(model):
        if site.coeffs is not None:
            site.coeffs.data.uniform_(-0.3, 0.3)
    runner = fused_forward.FusedBlocks(model.blocks)
    x = model.stem(torch.randn(3, 3, 8, 8))
    with torch.no_grad():
        for index, block in enumerate(model.blocks):
            folded = block.fold()
            projects = block.shortcut is not None and any(isinstance(m, torch.nn.Conv2d)
                                                          for m in block.shortcut.modules())
            assert (folded.shortcut is not None) == projects
            torch.testing.assert_close(runner.block_forward(index)(x), block(x), rtol=1e-5, atol=1e-5)
            x = block(x)
