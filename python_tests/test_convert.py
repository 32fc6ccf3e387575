"""convert(): every ReLU call site of a torchvision-style model becomes its own MaskedReLU."""
import pytest
import torch
import torch.nn as nn

import fastmask as fm
from fastmask.errors import FastmaskError

torchvision = pytest.importorskip("torchvision")


def test_torchvision_resnet18_all_ones_is_unchanged():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    converted = fm.convert(model, torch.randn(1, 3, 32, 32)).eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(converted(x), model(x))
    # stem relu + 2 call sites in each of the 8 BasicBlocks (self.relu is called twice per block)
    assert len(fm.masked_sites(converted)) == 17
    assert fm.relu_count(converted) == 64 * 16 * 16 + 2 * (2 * 64 * 8 * 8 + 2 * 128 * 4 * 4 + 2 * 256 * 2 * 2
                                                            + 2 * 512 * 1 * 1)


def test_converted_sites_are_independent_and_masks_take_effect():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.act = nn.ReLU()

        def forward(self, x):
            return self.act(self.lin(self.act(x))) + torch.relu(x)

    net = Net().eval()
    converted = fm.convert(net, torch.randn(1, 4))
    sites = fm.masked_sites(converted)
    assert len(sites) == 3
    for _, m in sites:
        m.mask.zero_()
    x = torch.randn(3, 4)
    torch.testing.assert_close(converted(x), net.lin(x) + x)


def test_model_without_relu_is_an_error():
    with pytest.raises(FastmaskError, match="no ReLU"):
        fm.convert(nn.Linear(3, 3), torch.randn(1, 3))


def test_converted_sites_take_hypotheses_per_group():
    """A converted model scores K masks in one stacked batch like our own models: group k uses candidate k."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 5, 3)).eval()
    converted = fm.convert(net, torch.randn(1, 3, 5, 5)).eval()
    ms = fm.MaskSet(converted)
    candidates = [torch.arange(0, 40), torch.arange(50, 100)]
    x = torch.randn(6, 3, 5, 5)
    with torch.no_grad(), ms.hypotheses(ms.candidate_masks(candidates)):
        stacked = converted(torch.cat([x, x]))
    assert all(site.hypotheses is None for site in ms.sites)
    saved = ms.snapshot()
    for k, candidate in enumerate(candidates):
        ms.remove(candidate)
        with torch.no_grad():
            torch.testing.assert_close(stacked[6 * k:6 * (k + 1)], converted(x))
        ms.restore(saved)
