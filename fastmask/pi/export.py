r"""ONNX export of a masked model in which every masked site evaluates Relu on its kept positions only.

A PI runtime pays for each element that reaches a Relu node, so a site is lowered as
    Flatten -> Gather(kept) -> Relu --\
       \--------------------------------> Concat -> Gather(each position's source) -> Reshape
(a removed position reads its own input: the identity), or, with the polynomial replacement, whose products are paid
per element,
    Flatten -> Gather(kept) -> Relu ----------------------\
            -> Gather(removed) -> c0 + c1 x + c2 x^2 ------> Concat -> Gather(inverse permutation) -> Reshape
with the index tensors as Constant nodes (CrypTen turns integer initializers into Parameters and fails on them).
The graph is kept small, since a runtime's interpreter pays per node: a site adds 8 nodes, sites of one shape share
their Reshape's shape.
No Where (it evaluates both branches), no ScatterElements and no Identity node (CrypTen's importer rejects both).
BatchNorm is folded into the conv before it, or into the classifier; the one BN with neither (a pre-activation block's
first BN, which reads a residual sum) becomes a per-channel Mul + Add.

Beside the .onnx file: a JSON manifest (per site: name, shape, kept count, replacement) and the masks in safetensors,
for frameworks that take masks directly.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn

from ..errors import FastmaskError
from ..models.resnet import BasicBlock, ResNet18
from ..models.wide_resnet import PreActBlock, WideResNet22
from ..nn import MaskedReLU, masked_sites, relu_count
from .fold import bn_affine, bn_linear, conv_bn

OPSET = 17
IR_VERSION = 8  # the lowest IR that carries opset 17: readable by older runtimes and by CrypTen's onnx
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
MANIFEST_FORMAT = "fastmask-pi-manifest"
# CrypTen reads Constant values as float32; larger indices would not round-trip exactly.
MAX_EXACT_INDEX = 2 ** 24


def _require_onnx():
    try:
        import onnx
    except ImportError as err:
        raise FastmaskError("ONNX export needs the onnx package; install it with pip install -e .[pi]") from err
    return onnx


class _Graph:
    """Collects nodes, float initializers and Constant nodes under unique, importer-safe names ([A-Za-z0-9_])."""

    def __init__(self, onnx):
        self.onnx = onnx
        self.nodes, self.initializers, self.used = [], [], set()

    def name(self, hint: str) -> str:
        base = "".join(c if c.isalnum() else "_" for c in hint).strip("_") or "t"
        candidate, index = base, 1
        while candidate in self.used:
            candidate, index = f"{base}_{index}", index + 1
        self.used.add(candidate)
        return candidate

    def weight(self, hint: str, tensor: torch.Tensor) -> str:
        name = self.name(hint)
        array = tensor.detach().cpu().float().numpy()
        self.initializers.append(self.onnx.numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def constant(self, hint: str, array: np.ndarray) -> str:
        name = self.name(hint)
        value = self.onnx.numpy_helper.from_array(np.ascontiguousarray(array), name + "_value")
        self.nodes.append(self.onnx.helper.make_node("Constant", [], [name], name=name, value=value))
        return name

    def op(self, op_type: str, inputs: list[str], hint: str, **attributes) -> str:
        name = self.name(hint)
        self.nodes.append(self.onnx.helper.make_node(op_type, inputs, [name], name=name, **attributes))
        return name


class _Lowering:
    """Walks a fastmask model in forward order and emits its ONNX nodes; records each masked site for the manifest."""

    def __init__(self, model: nn.Module, onnx):
        self.graph = _Graph(onnx)
        self.site_names = {id(module): name for name, module in masked_sites(model)}
        self.sites: list[dict] = []
        self.mask_tensors: dict[str, torch.Tensor] = {}
        self.shapes: dict[tuple[int, ...], str] = {}

    def conv(self, x: str, conv: nn.Conv2d, bn: Optional[nn.BatchNorm2d], hint: str) -> str:
        weight, bias = conv_bn(conv, bn)
        g = self.graph
        return g.op("Conv", [x, g.weight(hint + "_weight", weight), g.weight(hint + "_bias", bias)], hint,
                    kernel_shape=list(conv.kernel_size), strides=list(conv.stride),
                    pads=[int(p) for p in conv.padding] * 2, dilations=list(conv.dilation), group=conv.groups)

    def affine(self, x: str, bn: nn.BatchNorm2d, hint: str) -> str:
        scale, shift = bn_affine(bn)
        g = self.graph
        scaled = g.op("Mul", [x, g.weight(hint + "_scale", scale.float().view(-1, 1, 1))], hint + "_mul")
        return g.op("Add", [scaled, g.weight(hint + "_shift", shift.float().view(-1, 1, 1))], hint)

    def add(self, a: str, b: str, hint: str) -> str:
        return self.graph.op("Add", [a, b], hint)

    def head(self, x: str, weight: torch.Tensor, bias: torch.Tensor) -> str:
        g = self.graph
        pooled = g.op("GlobalAveragePool", [x], "pool")
        flat = g.op("Flatten", [pooled], "pool_flat", axis=1)
        return g.op("Gemm", [flat, g.weight("linear_weight", weight), g.weight("linear_bias", bias)], OUTPUT_NAME,
                    alpha=1.0, beta=1.0, transB=1)

    def site(self, x: str, site: MaskedReLU) -> str:
        """Relu on the kept positions only; the removed ones get the site's replacement."""
        if site.alpha is not None or site.hypotheses is not None:
            raise FastmaskError("the model holds soft (SNL) or candidate masks; export a model with binary masks")
        name = self.site_names[id(site)]
        mask = site.mask.detach().cpu().bool()
        flat = mask.reshape(-1).numpy()
        total, kept_count = flat.size, int(flat.sum())
        if total >= MAX_EXACT_INDEX:
            raise FastmaskError(f"site {name} has {total} positions; PI export supports fewer than {MAX_EXACT_INDEX}")
        polynomial = site.coeffs is not None
        entry = {"name": name, "shape": list(mask.shape), "kept": kept_count, "total": int(total),
                 "replacement": "polynomial" if polynomial else "identity", "mask_key": f"{name}.mask"}
        if polynomial:
            entry["coeffs_key"] = f"{name}.coeffs"
        self.sites.append(entry)
        self.mask_tensors[f"{name}.mask"] = mask.to(torch.uint8).contiguous()
        if polynomial:
            self.mask_tensors[f"{name}.coeffs"] = site.coeffs.detach().cpu().float().contiguous()
        g = self.graph
        if kept_count == total:
            return g.op("Relu", [x], name + "_relu")
        if kept_count == 0:
            return self.replacement(x, site, None, name)
        kept = np.flatnonzero(flat).astype(np.int64)
        flattened = g.op("Flatten", [x], name + "_flat", axis=1)
        relu_in = g.op("Gather", [flattened, g.constant(name + "_kept_idx", kept)], name + "_kept", axis=1)
        relu_out = g.op("Relu", [relu_in], name + "_relu")
        if polynomial:  # the polynomial's products are paid per element: only the removed positions get one
            removed = np.flatnonzero(~flat).astype(np.int64)
            rest = g.op("Gather", [flattened, g.constant(name + "_removed_idx", removed)], name + "_removed", axis=1)
            sources = [relu_out, self.replacement(rest, site, removed, name)]
            source_of = np.empty(total, dtype=np.int64)
            source_of[np.concatenate([kept, removed])] = np.arange(total, dtype=np.int64)
        else:  # identity: a removed position reads its own input, a kept one its Relu output
            sources = [flattened, relu_out]
            source_of = np.arange(total, dtype=np.int64)
            source_of[kept] = total + np.arange(kept_count, dtype=np.int64)
        joined = g.op("Concat", sources, name + "_concat", axis=1)
        ordered = g.op("Gather", [joined, g.constant(name + "_source_idx", source_of)], name + "_ordered", axis=1)
        return g.op("Reshape", [ordered, self.shape_constant(mask.shape)], name + "_out")

    def shape_constant(self, shape: tuple[int, ...]) -> str:
        """One Constant per activation shape, shared by the sites of that shape: every node costs the runtime's graph
        interpreter time, whatever it computes."""
        key = tuple(int(s) for s in shape)
        if key not in self.shapes:
            self.shapes[key] = self.graph.constant("shape_" + "x".join(map(str, key)),
                                                   np.array([-1, *key], dtype=np.int64))
        return self.shapes[key]

    def replacement(self, x: str, site: MaskedReLU, removed: Optional[np.ndarray], name: str) -> str:
        """Identity (no node), or (c2 x + c1) x + c0 with per-element coefficients (per channel if removed is None).

        The secret product (. ) x is left out when every c2 is 0, since the polynomial is then linear."""
        if site.coeffs is None:
            return x
        coeffs = site.coeffs.detach().cpu().float()
        if removed is None:
            c0, c1, c2 = (coeffs[:, k].reshape(-1, *([1] * (site.mask.dim() - 1))) for k in range(3))
        else:
            per_channel = int(np.prod(site.mask.shape[1:]))
            channel = torch.from_numpy(removed // per_channel)
            c0, c1, c2 = (coeffs[channel, k] for k in range(3))
        g = self.graph
        if bool((c2 == 0).all()):
            scaled = g.op("Mul", [x, g.weight(name + "_c1", c1)], name + "_poly_c1x")
        else:
            inner = g.op("Mul", [x, g.weight(name + "_c2", c2)], name + "_poly_c2x")
            inner = g.op("Add", [inner, g.weight(name + "_c1", c1)], name + "_poly_inner")
            scaled = g.op("Mul", [inner, x], name + "_poly_times_x")
        return g.op("Add", [scaled, g.weight(name + "_c0", c0)], name + "_poly")


def _lower_resnet18(low: _Lowering, model: ResNet18, x: str) -> str:
    out = low.conv(x, model.conv1, model.bn1, "stem")
    for index, block in enumerate(model.blocks):
        if not isinstance(block, BasicBlock):
            raise FastmaskError(f"resnet18 block {index} is a {type(block).__name__}; only BasicBlock is exported")
        hint = f"block{index}"
        inner = low.site(low.conv(out, block.conv1, block.bn1, hint + "_conv1"), block.relu1)
        inner = low.conv(inner, block.conv2, block.bn2, hint + "_conv2")
        skip = out
        if len(block.shortcut) > 0:
            skip = low.conv(out, block.shortcut[0], block.shortcut[1], hint + "_shortcut")
        out = low.site(low.add(inner, skip, hint + "_add"), block.relu2)
    return low.head(out, model.linear.weight.detach().float(), model.linear.bias.detach().float())


def _lower_wide_resnet(low: _Lowering, model: WideResNet22, x: str) -> str:
    out = low.conv(x, model.conv1, None, "stem")
    for index, block in enumerate(model.blocks):
        if not isinstance(block, PreActBlock):
            raise FastmaskError(f"wide_resnet22 block {index} is a {type(block).__name__}; only PreActBlock is "
                                "exported")
        hint = f"block{index}"
        activated = low.site(low.affine(out, block.bn1, hint + "_bn1"), block.relu1)
        inner = low.site(low.conv(activated, block.conv1, block.bn2, hint + "_conv1"), block.relu2)
        inner = low.conv(inner, block.conv2, None, hint + "_conv2")
        skip = out if block.shortcut is None else low.conv(activated, block.shortcut, None, hint + "_shortcut")
        out = low.add(inner, skip, hint + "_add")
    return low.head(out, *bn_linear(model.bn, model.linear))


def _input_shape(model: nn.Module) -> tuple[int, int, int]:
    spec = getattr(model, "fastmask_spec", None)
    if spec:
        return int(spec.get("in_channels", 3)), int(spec["image_size"]), int(spec["image_size"])
    return int(model.conv1.in_channels), 0, 0


def build_onnx(model: nn.Module):
    """(onnx.ModelProto, manifest dict, {key: mask or coeffs tensor}) for a fastmask resnet18 or wide_resnet22_8, or
    a converted model (fastmask.models.external.ConvertedModel, lowered by fastmask.pi.export_fx)."""
    from ..models.external import ConvertedModel

    onnx = _require_onnx()
    if isinstance(model, ResNet18):
        lower = _lower_resnet18
    elif isinstance(model, WideResNet22):
        lower = _lower_wide_resnet
    elif isinstance(model, ConvertedModel):
        from .export_fx import lower_converted as lower
    else:
        raise FastmaskError(f"PI export supports fastmask's resnet18 and wide_resnet22_8 and converted models, not "
                            f"{type(model).__name__}; build the model with fastmask.models.create or "
                            "fastmask.models.external.build, or load a fastmask checkpoint")
    channels, height, width = _input_shape(model)
    low = _Lowering(model, onnx)
    low.graph.used.add(INPUT_NAME)
    with torch.no_grad():
        output = lower(low, model, INPUT_NAME)
    num_classes = int(model.fastmask_spec["num_classes"]) if isinstance(model, ConvertedModel) else \
        int(model.linear.out_features)
    helper, tensor_proto = onnx.helper, onnx.TensorProto
    spatial = [height or "height", width or "width"]
    graph = helper.make_graph(
        low.graph.nodes, "fastmask",
        [helper.make_tensor_value_info(INPUT_NAME, tensor_proto.FLOAT, ["batch", channels, *spatial])],
        [helper.make_tensor_value_info(output, tensor_proto.FLOAT, ["batch", num_classes])],
        initializer=low.graph.initializers)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION,
                              producer_name="fastmask")
    onnx.checker.check_model(proto)
    manifest = {"format": MANIFEST_FORMAT, "version": 1, "model": dict(getattr(model, "fastmask_spec", {})),
                "input": {"name": INPUT_NAME, "shape": ["batch", channels, height, width],
                          "note": "normalized images, as fastmask.data.normalize gives them"},
                "output": {"name": output, "shape": ["batch", num_classes]},
                "relu_count": relu_count(model),
                "mask_convention": "mask[c, h, w] = 1 keeps the ReLU; 0 applies the replacement: identity, or "
                                   "c0 + c1 x + c2 x^2 with coeffs[c] = (c0, c1, c2)",
                "sites": low.sites}
    return proto, manifest, low.mask_tensors


def companion_paths(onnx_path: str | Path) -> tuple[Path, Path]:
    """(manifest, masks) written beside an .onnx file: model.onnx -> model.json, model.masks.safetensors."""
    onnx_path = Path(onnx_path)
    return onnx_path.with_suffix(".json"), onnx_path.with_suffix(".masks.safetensors")


def export_model(model: nn.Module, out: str | Path) -> dict:
    """Writes out (.onnx), its manifest and its masks; returns the manifest (with the file names it refers to)."""
    from safetensors.torch import save_file

    onnx = _require_onnx()
    out = Path(out)
    if out.suffix != ".onnx":
        raise FastmaskError(f"--out must name an .onnx file, got {out}")
    was_training = model.training
    model.eval()
    try:
        proto, manifest, masks = build_onnx(model)
    finally:
        model.train(was_training)
    manifest_path, masks_path = companion_paths(out)
    manifest["onnx"], manifest["masks"] = out.name, masks_path.name
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(out))
    save_file(masks, str(masks_path), metadata={"format": MANIFEST_FORMAT})
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def relu_elements(proto) -> int:
    """Elements per image that reach a Relu node, from ONNX shape inference: what a PI runtime evaluates."""
    onnx = _require_onnx()
    inferred = onnx.shape_inference.infer_shapes(proto, data_prop=True)
    shapes = {}
    for info in list(inferred.graph.value_info) + list(inferred.graph.input):
        dims = info.type.tensor_type.shape.dim
        shapes[info.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    total = 0
    for node in inferred.graph.node:
        if node.op_type != "Relu":
            continue
        dims = shapes.get(node.input[0])
        if dims is None or any(d is None for d in dims[1:]):
            raise FastmaskError(f"the input shape of Relu node {node.name} could not be inferred")
        total += int(np.prod(dims[1:]))
    return total
