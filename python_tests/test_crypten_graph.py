"""fastmask's linear-time replacement of CrypTen's Graph.forward computes the same nodes in the same order with the
same inputs, on the graphs fastmask exports (masked sites with partial, empty and full masks, the polynomial)."""
import importlib.util

import pytest
import torch

import fastmask as fm

pytest.importorskip("onnx")
if importlib.util.find_spec("crypten") is None:
    pytest.skip("CrypTen is not installed (pip install -e .[pi])", allow_module_level=True)

from fastmask.pi import crypten_compat  # noqa: E402
from fastmask.pi.export import export_model  # noqa: E402


class Recorder:
    """Stands in for a CrypTen module: records its call with the tokens it was given, and returns its name."""

    def __init__(self, name, calls, output_names=None):
        self.name, self.calls = name, calls
        if output_names is not None:
            self._output_names = output_names

    def __call__(self, inputs):
        self.calls.append((self.name, tuple(inputs) if isinstance(inputs, list) else inputs))
        names = getattr(self, "_output_names", None)
        return tuple(names) if names and len(names) > 1 else self.name


def recorded_run(graph, forward):
    calls = []
    original = graph._modules
    graph._modules = {name: Recorder(name, calls, getattr(module, "_output_names", None))
                      for name, module in original.items()}
    try:
        output = forward(graph, "image")
    finally:
        graph._modules = original
    return calls, output


@pytest.mark.parametrize("polynomial", [False, True])
def test_linear_graph_forward_matches_crypten_order_and_values(tmp_path, polynomial):
    crypten = crypten_compat.import_crypten()
    torch.manual_seed(0)
    model = fm.models.create("resnet18", 10, 8, width=2, in_channels=1, polynomial=polynomial)
    for index, (_, site) in enumerate(fm.masked_sites(model)):
        site.mask.copy_(torch.rand(site.mask.shape) < (0.0 if index % 5 == 0 else 0.4 if index % 5 < 4 else 1.0))
        if site.coeffs is not None:
            site.coeffs.data = torch.randn(site.coeffs.shape)
    export_model(model, tmp_path / "model.onnx")
    with open(tmp_path / "model.onnx", "rb") as f:
        graph = crypten.nn.from_onnx(f)
    assert crypten.nn.Graph.forward is crypten_compat.linear_graph_forward
    theirs = recorded_run(graph, crypten_compat.quadratic_graph_forward)
    ours = recorded_run(graph, crypten_compat.linear_graph_forward)
    assert ours == theirs
    assert len(ours[0]) == len(graph._graph)
    ours_again = recorded_run(graph, crypten_compat.linear_graph_forward)  # the cached schedule
    assert ours_again == theirs


def test_plain_settings_keep_every_value_and_temp_override():
    crypten_compat.import_crypten()
    from crypten.config import CrypTenConfig

    omega, plain = CrypTenConfig(), CrypTenConfig()
    crypten_compat.plain_settings(plain)

    def leaves(node, prefix=""):
        for key in node:
            value = node[key] if hasattr(node, "__getitem__") and not hasattr(node, "__dict__") else getattr(node, key)
            yield from leaves(value, f"{prefix}{key}.") if hasattr(value, "keys") else [(f"{prefix}{key}", value)]

    for dotted, value in leaves(omega.config):
        assert plain[dotted] == value, dotted
    before = plain["functions.max_method"]
    with plain.temp_override({"functions.max_method": "pairwise", "encoder.precision_bits": 12}):
        assert plain["functions.max_method"] == "pairwise" and plain["encoder.precision_bits"] == 12
    assert plain["functions.max_method"] == before
    assert plain["encoder.precision_bits"] == omega["encoder.precision_bits"]
