"""MaskedReLU, the drop-in module behind every ReLU site, and convert(), which puts one at every ReLU call site."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.shape_prop import ShapeProp

from .errors import FastmaskError
from .ops import reference
from .ops.masked_act import masked_relu


class MaskedReLU(nn.Module):
    """ReLU kept where `mask` is 1, replaced where it is 0 (identity, or a learnable per-channel polynomial).

    mask is a bool buffer shaped like one image's activation ([C, H, W] or [D]), so it is saved with the model.
    Two transient states are used by the search code and never saved; MaskSet.hypotheses() and MaskSet.alphas() set
    them for the length of a `with` block:
    - `hypotheses` ([K, *shape]): K candidate masks scored in one pass; the batch is K stacked copies of the images.
    - `alpha` ([*shape] float Parameter): SNL's soft mask, alpha * relu(x) + (1 - alpha) * x.
    """

    def __init__(self, shape: Sequence[int], polynomial: bool = False, normalized_input: bool = True):
        super().__init__()
        shape = tuple(int(s) for s in shape)
        self.register_buffer("mask", torch.ones(shape, dtype=torch.bool))
        # Whether the site's input is a normalization's output. Only such sites take a polynomial replacement: a
        # quadratic of the residual stream (a site after a residual add) squares a sum that grows block after block,
        # and with most ReLUs removed the outputs compound to overflow; those sites keep the identity.
        self.normalized_input = bool(normalized_input)
        if polynomial and self.normalized_input:  # start as the identity: a fresh site equals plain linearization
            self.coeffs = nn.Parameter(torch.tensor([[0.0, 1.0, 0.0]]).repeat(shape[0], 1))
        else:
            self.coeffs = None
        self.hypotheses: Optional[torch.Tensor] = None
        self.alpha: Optional[nn.Parameter] = None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.mask.shape)

    def relu_count(self) -> int:
        return int(self.mask.sum())

    def active_mask(self) -> torch.Tensor:
        """The masks this site applies now, [G, *shape]: the hypotheses when set, else its own mask as one group."""
        return self.hypotheses if self.hypotheses is not None else self.mask.unsqueeze(0)

    def attach_alpha(self) -> nn.Parameter:
        """Gives the site SNL's alpha: 1 where its ReLU is present, 0 where absent. The absent ones stay 0: their
        gradient is masked to 0 (and the L1 subgradient of |0| is 0 too), so no optimizer brings them back."""
        keep = self.mask.detach().clone()
        alpha = nn.Parameter(keep.float())
        alpha.register_hook(lambda grad: grad * keep)
        self.alpha = alpha
        return alpha

    def detach_alpha(self) -> None:
        self.alpha = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.alpha is not None:
            return reference.soft_masked_act(x, self.alpha, self.coeffs)
        return masked_relu(x, self.active_mask(), self.coeffs)

    def extra_repr(self) -> str:
        return (f"shape={self.shape}, kept={self.relu_count()}, polynomial={self.coeffs is not None}, "
                f"normalized_input={self.normalized_input}")


def masked_sites(model: nn.Module) -> list[tuple[str, MaskedReLU]]:
    """Every MaskedReLU of the model, in registration order (our models and convert() register in forward order)."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MaskedReLU)]


def relu_count(model: nn.Module) -> int:
    """Kept (present) ReLUs over every masked site, counted per (channel, h, w) as SNL does."""
    return sum(m.relu_count() for _, m in masked_sites(model))


_RELU_FUNCTIONS = (F.relu, torch.relu, torch.relu_, F.relu_)


def convert(model: nn.Module, example_input: torch.Tensor, polynomial: bool = False) -> torch.fx.GraphModule:
    """Returns a copy of `model` in which every ReLU call site is its own MaskedReLU with an all-ones mask.

    A ReLU module called at two places (torchvision's BasicBlock calls self.relu twice) becomes two sites, since
    each place needs its own mask. A site takes a polynomial only when its input is a BatchNorm module's output
    (MaskedReLU.normalized_input). Shapes come from one forward pass of `example_input` (batch size is irrelevant).
    """
    try:
        graph_module = torch.fx.symbolic_trace(model)
    except Exception as err:  # data-dependent control flow and the like
        raise FastmaskError(f"convert: the model cannot be traced by torch.fx ({err.__class__.__name__}: {err}); "
                            "build it from fastmask.models or make its forward traceable") from err
    was_training = graph_module.training
    graph_module.eval()
    with torch.no_grad():
        ShapeProp(graph_module).propagate(example_input)
    graph_module.train(was_training)
    modules = dict(graph_module.named_modules())
    count = 0
    for node in list(graph_module.graph.nodes):
        is_relu_module = node.op == "call_module" and isinstance(modules.get(node.target), nn.ReLU)
        is_relu_function = node.op == "call_function" and node.target in _RELU_FUNCTIONS
        is_relu_method = node.op == "call_method" and node.target in ("relu", "relu_")
        if not (is_relu_module or is_relu_function or is_relu_method):
            continue
        shape = node.meta["tensor_meta"].shape[1:]
        name = f"masked_relu_{count}"
        count += 1
        source = node.args[0]
        normalized = (isinstance(source, torch.fx.Node) and source.op == "call_module"
                      and isinstance(modules.get(source.target), nn.modules.batchnorm._BatchNorm))
        graph_module.add_submodule(name, MaskedReLU(shape, polynomial=polynomial, normalized_input=normalized))
        with graph_module.graph.inserting_after(node):
            new_node = graph_module.graph.call_module(name, args=(node.args[0],))
        node.replace_all_uses_with(new_node)
        graph_module.graph.erase_node(node)
    if count == 0:
        raise FastmaskError("convert: the model has no ReLU call sites to mask")
    graph_module.graph.lint()
    graph_module.delete_all_unused_submodules()
    graph_module.recompile()
    return graph_module
