"""ONNX lowering of a converted model (fastmask.models.external.ConvertedModel): a walk of its torch.fx graph.

Each node becomes the ONNX nodes a PI runtime reads (Conv, Gemm, MatMul, Add, Mul, MaxPool, AveragePool,
GlobalAveragePool, Flatten, Concat, Reshape), and each MaskedReLU is lowered by _Lowering.site, so Relu sees only
its kept positions. A BatchNorm whose input is a conv read by nothing else is folded into that conv; any other
BatchNorm becomes a per-channel Mul + Add. An adaptive average pool to 1x1 is GlobalAveragePool; to any other size it
is its exact linear map (a MatMul with a public constant), which also covers the upsampling a 32x32 VGG's pool does.
Operations outside this set (ReLU6, GELU, attention, ...) are refused by name.
"""
from __future__ import annotations

import operator
from typing import Any

import numpy as np
import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.shape_prop import ShapeProp

from ..errors import FastmaskError
from ..nn import MaskedReLU

OUTPUT_NAME = "logits"
_PASSTHROUGH_MODULES = (nn.Dropout, nn.Dropout2d, nn.Identity)
_PASSTHROUGH_FUNCTIONS = (F.dropout,)
_PASSTHROUGH_METHODS = ("contiguous", "clone")


def _shape(node: torch.fx.Node) -> list[int]:
    meta = node.meta.get("tensor_meta")
    if meta is None or not hasattr(meta, "shape"):
        raise FastmaskError(f"PI export: the shape of {node.name} is unknown")
    return list(meta.shape)


def _pair(value) -> list[int]:
    return [int(v) for v in value] if isinstance(value, (tuple, list)) else [int(value)] * 2


def _adaptive_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] averaging matrix of one axis of adaptive_avg_pool (torch's start/end rule)."""
    matrix = np.zeros((out_size, in_size), dtype=np.float32)
    for i in range(out_size):
        start = (i * in_size) // out_size
        end = -(-((i + 1) * in_size) // out_size)
        matrix[i, start:end] = 1.0 / (end - start)
    return matrix


class _FxLowering:
    def __init__(self, low, model: nn.Module):
        self.low = low
        self.g = low.graph
        self.net: torch.fx.GraphModule = model.net
        self.modules = dict(self.net.named_modules())

    def run(self, x: str) -> str:
        env: dict[torch.fx.Node, Any] = {}
        folded_convs = self._foldable_convs()
        output = None
        for node in self.net.graph.nodes:
            if node.op == "placeholder":
                env[node] = x
            elif node.op == "output":
                output = node.args[0]
            elif node.op == "call_module":
                env[node] = self._module(node, env, folded_convs)
            elif node.op == "call_function":
                env[node] = self._function(node, env)
            elif node.op == "call_method":
                env[node] = self._method(node, env)
            else:
                raise FastmaskError(f"PI export cannot lower the graph node {node.name} ({node.op} {node.target})")
        if not isinstance(output, torch.fx.Node) or not isinstance(env.get(output), str):
            raise FastmaskError("PI export needs a model whose forward returns one logits tensor")
        return self._rename(env[output], OUTPUT_NAME)

    # ---- helpers ---------------------------------------------------------------------------------------------
    def _foldable_convs(self) -> set:
        """Conv nodes whose only reader is a BatchNorm2d: emitted with that BN folded in, at the BN."""
        folded = set()
        for node in self.net.graph.nodes:
            if node.op == "call_module" and isinstance(self.modules.get(node.target), nn.BatchNorm2d):
                source = node.args[0]
                if (isinstance(source, torch.fx.Node) and source.op == "call_module"
                        and isinstance(self.modules.get(source.target), nn.Conv2d) and len(source.users) == 1):
                    folded.add(source)
        return folded

    def _rename(self, name: str, new: str) -> str:
        if name in (new,):
            return name
        if new in self.g.used:
            raise FastmaskError(f"PI export: the name {new} is taken")
        for node in self.g.nodes:
            node.output[:] = [new if o == name else o for o in node.output]
            node.input[:] = [new if i == name else i for i in node.input]
        if not any(new in node.output for node in self.g.nodes):
            raise FastmaskError("PI export: the model's output is not computed by any node")
        self.g.used.add(new)
        return new

    def _arg(self, env, value) -> str:
        if not isinstance(value, torch.fx.Node) or not isinstance(env.get(value), str):
            raise FastmaskError(f"PI export: {value} is not a tensor the lowering knows")
        return env[value]

    def _reshape(self, node: torch.fx.Node, x: str) -> str:
        shape = np.array([-1, *_shape(node)[1:]], dtype=np.int64)
        return self.g.op("Reshape", [x, self.g.constant(node.name + "_shape", shape)], node.name)

    def _adaptive_avg(self, node: torch.fx.Node, x: str, output_size) -> str:
        in_shape, out_shape = _shape(node.args[0]), _shape(node)
        (h_in, w_in), (h_out, w_out) = in_shape[2:], out_shape[2:]
        if h_out == 1 and w_out == 1:
            return self.g.op("GlobalAveragePool", [x], node.name)
        if h_in % h_out == 0 and w_in % w_out == 0:
            kernel = [h_in // h_out, w_in // w_out]
            return self.g.op("AveragePool", [x], node.name, kernel_shape=kernel, strides=kernel)
        # out[c] = A_h x[c] A_w^T, as one matrix on the flattened plane: [H_in*W_in] -> [H_out*W_out]
        matrix = np.kron(_adaptive_matrix(h_in, h_out), _adaptive_matrix(w_in, w_out))  # [out, in]
        channels = in_shape[1]
        flat = self.g.op("Reshape", [x, self.g.constant(node.name + "_in_shape",
                                                        np.array([-1, channels, h_in * w_in], dtype=np.int64))],
                         node.name + "_flat")
        mixed = self.g.op("MatMul", [flat, self.g.weight(node.name + "_matrix", torch.from_numpy(matrix.T.copy()))],
                          node.name + "_matmul")
        return self.g.op("Reshape", [mixed, self.g.constant(node.name + "_out_shape",
                                                            np.array([-1, channels, h_out, w_out], dtype=np.int64))],
                         node.name)

    def _max_pool(self, node, x, kernel, stride, padding, dilation, ceil_mode) -> str:
        kernel = _pair(kernel)
        stride = _pair(stride if stride not in (None, []) else kernel)
        return self.g.op("MaxPool", [x], node.name, kernel_shape=kernel, strides=stride,
                         pads=_pair(padding) * 2, dilations=_pair(dilation), ceil_mode=int(bool(ceil_mode)))

    def _avg_pool(self, node, x, kernel, stride, padding, ceil_mode, count_include_pad, divisor=None) -> str:
        if divisor is not None:
            raise FastmaskError(f"PI export: {node.name} sets divisor_override, which ONNX's AveragePool lacks")
        kernel = _pair(kernel)
        stride = _pair(stride if stride not in (None, []) else kernel)
        return self.g.op("AveragePool", [x], node.name, kernel_shape=kernel, strides=stride, pads=_pair(padding) * 2,
                         ceil_mode=int(bool(ceil_mode)), count_include_pad=int(bool(count_include_pad)))

    def _linear(self, node, x, weight: torch.Tensor, bias) -> str:
        bias = bias if bias is not None else torch.zeros(weight.shape[0])
        if len(_shape(node.args[0])) == 2:
            return self.g.op("Gemm", [x, self.g.weight(node.name + "_weight", weight),
                                      self.g.weight(node.name + "_bias", bias)], node.name,
                             alpha=1.0, beta=1.0, transB=1)
        product = self.g.op("MatMul", [x, self.g.weight(node.name + "_weight_t", weight.t().contiguous())],
                            node.name + "_matmul")
        return self.g.op("Add", [product, self.g.weight(node.name + "_bias", bias)], node.name)

    def _flatten(self, node, x, start_dim=1, end_dim=-1) -> str:
        if start_dim == 1 and end_dim == -1:
            return self.g.op("Flatten", [x], node.name, axis=1)
        return self._reshape(node, x)

    # ---- node kinds ------------------------------------------------------------------------------------------
    def _module(self, node, env, folded_convs) -> Any:
        module = self.modules[node.target]
        if node in folded_convs:
            return ("conv", node)  # emitted at its BatchNorm
        x = self._arg(env, node.args[0]) if not isinstance(env.get(node.args[0]), tuple) else None
        if isinstance(module, MaskedReLU):
            return self.low.site(x, module)
        if isinstance(module, nn.BatchNorm2d):
            pending = env.get(node.args[0])
            if isinstance(pending, tuple):
                conv_node = pending[1]
                return self.low.conv(self._arg(env, conv_node.args[0]), self.modules[conv_node.target], module,
                                     node.name)
            return self.low.affine(x, module, node.name)
        if isinstance(module, nn.Conv2d):
            if module.padding_mode != "zeros" or isinstance(module.padding, str):
                raise FastmaskError(f"PI export: conv {node.target} uses padding {module.padding!r} "
                                    f"({module.padding_mode}); only numeric zero padding is lowered")
            return self.low.conv(x, module, None, node.name)
        if isinstance(module, nn.Linear):
            return self._linear(node, x, module.weight.detach().float(),
                                None if module.bias is None else module.bias.detach().float())
        if isinstance(module, nn.MaxPool2d):
            if module.return_indices:
                raise FastmaskError(f"PI export: {node.target} returns indices")
            return self._max_pool(node, x, module.kernel_size, module.stride, module.padding, module.dilation,
                                  module.ceil_mode)
        if isinstance(module, nn.AvgPool2d):
            return self._avg_pool(node, x, module.kernel_size, module.stride, module.padding, module.ceil_mode,
                                  module.count_include_pad, module.divisor_override)
        if isinstance(module, nn.AdaptiveAvgPool2d):
            return self._adaptive_avg(node, x, module.output_size)
        if isinstance(module, nn.Flatten):
            return self._flatten(node, x, module.start_dim, module.end_dim)
        if isinstance(module, _PASSTHROUGH_MODULES):
            return x
        raise FastmaskError(f"PI export cannot lower {node.target} ({type(module).__name__}); it lowers Conv2d, "
                            "BatchNorm2d, Linear, pooling, Flatten, Dropout and masked ReLU sites")

    def _function(self, node, env) -> Any:
        target, args, kwargs = node.target, node.args, node.kwargs
        if target in (operator.add, torch.add, operator.mul, torch.mul):
            a, b = args[0], args[1]
            if not (isinstance(a, torch.fx.Node) and isinstance(b, torch.fx.Node)) or kwargs.get("alpha", 1) != 1:
                raise FastmaskError(f"PI export lowers {node.name} only as a sum or product of two tensors")
            kind = "Add" if target in (operator.add, torch.add) else "Mul"
            return self.g.op(kind, [self._arg(env, a), self._arg(env, b)], node.name)
        if target is torch.cat:
            tensors = args[0]
            if len(tensors) == 1:  # densenet's first layer of a block: the identity (CrypTen's Concat needs two)
                return self._arg(env, tensors[0])
            dim = kwargs.get("dim", args[1] if len(args) > 1 else 0)
            rank = len(_shape(node))
            return self.g.op("Concat", [self._arg(env, t) for t in tensors], node.name, axis=int(dim) % rank)
        if target is torch.flatten:
            start = kwargs.get("start_dim", args[1] if len(args) > 1 else 0)
            end = kwargs.get("end_dim", args[2] if len(args) > 2 else -1)
            return self._flatten(node, self._arg(env, args[0]), start, end)
        if target is F.adaptive_avg_pool2d:
            return self._adaptive_avg(node, self._arg(env, args[0]), args[1] if len(args) > 1 else None)
        if target is F.max_pool2d:
            bound = _bind(F.max_pool2d, args, kwargs)
            return self._max_pool(node, self._arg(env, args[0]), bound["kernel_size"], bound.get("stride"),
                                  bound.get("padding", 0), bound.get("dilation", 1), bound.get("ceil_mode", False))
        if target is F.avg_pool2d:
            bound = _bind(F.avg_pool2d, args, kwargs)
            return self._avg_pool(node, self._arg(env, args[0]), bound["kernel_size"], bound.get("stride"),
                                  bound.get("padding", 0), bound.get("ceil_mode", False),
                                  bound.get("count_include_pad", True), bound.get("divisor_override"))
        if target in _PASSTHROUGH_FUNCTIONS:
            return self._arg(env, args[0])
        if target is operator.getitem and not isinstance(env.get(args[0]), str):
            return None  # an index into a Python value (x.size()[0]): read only by reshapes, which use shapes
        name = getattr(target, "__name__", str(target))
        raise FastmaskError(f"PI export cannot lower the call {name} ({node.name})")

    def _method(self, node, env) -> Any:
        if node.target in ("size", "dim"):
            return None  # Python values: the reshapes that read them take their shapes from shape propagation
        x = self._arg(env, node.args[0])
        if node.target in ("view", "reshape"):
            return self._reshape(node, x)
        if node.target == "flatten":
            start = node.kwargs.get("start_dim", node.args[1] if len(node.args) > 1 else 0)
            end = node.kwargs.get("end_dim", node.args[2] if len(node.args) > 2 else -1)
            return self._flatten(node, x, start, end)
        if node.target in _PASSTHROUGH_METHODS:
            return x
        raise FastmaskError(f"PI export cannot lower the method .{node.target}() ({node.name})")


def _bind(function, args, kwargs) -> dict:
    names = {F.max_pool2d: ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"),
             F.avg_pool2d: ("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
                            "divisor_override")}[function]
    bound = dict(zip(names, args))
    bound.update(kwargs)
    return bound


def lower_converted(low, model: nn.Module, x: str) -> str:
    """Emits the converted model's graph into `low` (an export._Lowering); returns the logits' name."""
    spec = model.fastmask_spec
    example = torch.zeros(1, int(spec.get("in_channels", 3)), int(spec["image_size"]), int(spec["image_size"]))
    ShapeProp(model.net).propagate(example)
    return _FxLowering(low, model).run(x)
