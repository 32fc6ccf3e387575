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
