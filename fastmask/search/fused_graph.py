"""The fused scoring path for converted models (fastmask.models.external.ConvertedModel): the model's torch.fx graph
with every chain that folds rewritten into one fused call, then cut into stages.

Two chains fold:
- conv -> [BN] -> [+ residual] -> [masked ReLU]: one fastmask.ops.conv_bn_act call (a conv with neither a BN nor a
  site after it is left alone). The conv must be a plain 2-d one the op computes: groups 1, dilation 1, zero padding,
  the same stride and padding on both axes; a conv bias goes into the shift.
- BN -> masked ReLU with no foldable conv before it (a pre-activation, as in DenseNet): one scale, shift and masked
  ReLU pass.
Each node of a chain but its last must feed only the next one. Everything else runs as the model's own modules.

The chains are rewritten in a copy of the whole graph and the copy is cut afterwards, because the converted model's
own stages cut wherever one tensor is all that flows on, which splits conv -> BN -> ReLU into three. The copy shares
the model's modules; the folded weights, scales and shifts are recomputed by refresh() before each scoring call, since
finetuning changes them between calls but nothing changes them while candidates are scored.
"""
from __future__ import annotations

import operator
import weakref
from typing import Callable, Optional

import torch
import torch.fx
import torch.nn as nn

from ..nn import MaskedReLU
from ..ops.reference import fold_batchnorm
from .fused_forward import scale_shift_masked_relu

_ADDS = (operator.add, operator.iadd, torch.add)


class FusedConvStep(nn.Module):
    """conv -> [BN] -> [+ residual] -> [site] as one conv_bn_act call. The conv, BN and site are the model's own
    modules (children here only so that a stage's modules() names the site it holds)."""

    def __init__(self, conv: nn.Conv2d, bn: Optional[nn.BatchNorm2d], site: Optional[MaskedReLU],
                 conv_bn_act: Callable):
        super().__init__()
        self.conv, self.bn, self.site = conv, bn, site
        self.conv_bn_act = conv_bn_act
        self.refresh()

    def refresh(self) -> None:
        """Folds the current weights: the conv's weight in the kernel's layout, the BN (and conv bias) as scale and
        shift."""
        conv = self.conv
        if self.bn is not None:
            scale, shift = fold_batchnorm(self.bn)
        else:
            scale = torch.ones(conv.out_channels, device=conv.weight.device)
            shift = torch.zeros_like(scale)
        if conv.bias is not None:
            shift = shift + scale * conv.bias.detach().float()
        self.weight = conv.weight.detach().contiguous(memory_format=torch.channels_last)
        self.scale, self.shift = scale, shift

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = x.contiguous(memory_format=torch.channels_last)
        mask, coeffs = (self.site.active_mask(), self.site.coeffs) if self.site is not None else (None, None)
        call = dict(stride=self.conv.stride[0], padding=self.conv.padding[0])
        if residual is None or residual.shape == _output_shape(x, self.conv):
            return self.conv_bn_act(x, self.weight, self.scale, self.shift, mask=mask, residual=residual,
                                    coeffs=coeffs, **call)
        # A residual that broadcasts (not shaped like the output) is added the way the model adds it.
        y = self.conv_bn_act(x, self.weight, self.scale, self.shift, **call) + residual
        return self.site(y) if self.site is not None else y


class FusedScaleShiftSite(nn.Module):
    """BN -> site as one scale, shift and masked ReLU pass that keeps the input's memory format."""

    def __init__(self, bn: nn.BatchNorm2d, site: MaskedReLU):
        super().__init__()
        self.bn, self.site = bn, site
        self.refresh()

    def refresh(self) -> None:
        self.scale, self.shift = fold_batchnorm(self.bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return scale_shift_masked_relu(x, self.scale, self.shift, self.site)


def _output_shape(x: torch.Tensor, conv: nn.Conv2d) -> torch.Size:
    (kh, kw), s, p = conv.kernel_size, conv.stride[0], conv.padding[0]
    return torch.Size((x.shape[0], conv.out_channels, (x.shape[2] + 2 * p - kh) // s + 1,
                       (x.shape[3] + 2 * p - kw) // s + 1))


def _foldable_conv(module: nn.Module) -> bool:
    return (type(module) is nn.Conv2d and module.groups == 1 and tuple(module.dilation) == (1, 1)
            and module.padding_mode == "zeros" and not isinstance(module.padding, str)
            and module.stride[0] == module.stride[1] and module.padding[0] == module.padding[1])


def _foldable_bn(module: nn.Module, channels: int) -> bool:
    return (type(module) is nn.BatchNorm2d and module.num_features == channels and module.running_mean is not None)


def _only_user(node: torch.fx.Node) -> Optional[torch.fx.Node]:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _residual_of(add: torch.fx.Node, operand: torch.fx.Node) -> Optional[torch.fx.Node]:
    """The other operand when `add` is a plain two-tensor add of `operand` and another node, else None."""
    is_add = ((add.op == "call_function" and add.target in _ADDS) or
              (add.op == "call_method" and add.target in ("add", "add_")))
    if not is_add or add.kwargs or len(add.args) != 2:
        return None
    a, b = add.args
    if not (isinstance(a, torch.fx.Node) and isinstance(b, torch.fx.Node)) or a is b:
        return None
    return b if a is operand else a if b is operand else None


def rewrite(net: torch.fx.GraphModule, conv_bn_act: Callable) -> tuple[torch.fx.GraphModule, list[nn.Module]]:
    """A copy of net with every foldable chain as one call, and the fused steps it holds (see the module's text)."""
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    graph.output(graph.graph_copy(net.graph, env))
    fused = torch.fx.GraphModule(net, graph)
    modules = dict(fused.named_modules())
    steps: list[nn.Module] = []

    def module_of(node: Optional[torch.fx.Node]) -> Optional[nn.Module]:
        return modules.get(node.target) if node is not None and node.op == "call_module" else None

    def install(step: nn.Module, last: torch.fx.Node, args: tuple, chain: list[torch.fx.Node]) -> None:
        name = f"fused_step_{len(steps)}"
        fused.add_submodule(name, step)
        with graph.inserting_after(last):
            call = graph.call_module(name, args=args)
        last.replace_all_uses_with(call)
        for node in reversed(chain):
            graph.erase_node(node)
        steps.append(step)

    for node in list(graph.nodes):
        conv = module_of(node)
        if conv is not None and _foldable_conv(conv) and node.args and isinstance(node.args[0], torch.fx.Node):
            chain, last = [node], node
            bn = module_of(_only_user(last))
            if bn is not None and _foldable_bn(bn, conv.out_channels):
                last = _only_user(last)
                chain.append(last)
            else:
                bn = None
            residual, after = None, _only_user(last)
            if after is not None and (other := _residual_of(after, last)) is not None and other not in chain:
                residual, last = other, after
                chain.append(last)
            site = module_of(_only_user(last))
            if isinstance(site, MaskedReLU) and len(site.shape) == 3:
                last = _only_user(last)
                chain.append(last)
            else:
                site = None
            if bn is None and site is None:
                continue
            args = (node.args[0],) if residual is None else (node.args[0], residual)
            install(FusedConvStep(conv, bn, site, conv_bn_act), last, args, chain)
        elif (bn := module_of(node)) is not None and type(bn) is nn.BatchNorm2d and _foldable_bn(bn, bn.num_features):
            site_node = _only_user(node)
            site = module_of(site_node)
            if isinstance(site, MaskedReLU) and len(site.shape) == 3 and node.args:
                install(FusedScaleShiftSite(bn, site), site_node, (node.args[0],), [node, site_node])
    graph.lint()
    fused.recompile()
    return fused, steps


class FusedConverted:
    """A converted model's fused graph cut into stages, kept per model: the rewrite and the cut are made once, the
    folding is redone by refresh()."""

    def __init__(self, net: torch.fx.GraphModule, conv_bn_act: Callable):
        from ..models.external import stage_split

        self.conv_bn_act = conv_bn_act
        self.net, self.steps = rewrite(net, conv_bn_act)
        self.stages = stage_split(self.net)

    def refresh(self) -> None:
        for step in self.steps:
            step.refresh()


_FUSED: "weakref.WeakKeyDictionary[torch.fx.GraphModule, FusedConverted]" = weakref.WeakKeyDictionary()


def fused_stages(net: torch.fx.GraphModule, conv_bn_act: Callable) -> list[nn.Module]:
    """net's fused stages with the current weights folded in; the chain of stages computes net's forward."""
    fused = _FUSED.get(net)
    if fused is None or fused.conv_bn_act is not conv_bn_act:
        fused = _FUSED[net] = FusedConverted(net, conv_bn_act)
    else:
        fused.refresh()
    return fused.stages
