"""Models from outside the registry: any torchvision classification builder by name, or the user's own builder.

An arch string is one of
- a built-in name (resnet18, wide_resnet22_8): fastmask.models.create builds it;
- "torchvision:<name>", e.g. torchvision:resnet50: torchvision.models' builder, called with weights=None and the
  data's class count;
- "<file.py>:<function>" or "<package.module>:<function>": the user's function returning an nn.Module (called with
  num_classes= when it takes that argument, else with no argument).

Such a model is converted once (fastmask.nn.convert: every ReLU call site becomes a MaskedReLU) and wrapped in a
ConvertedModel, which carries the spec (arch, classes, image size, channels) that checkpoints store, so load_model
rebuilds it by calling the same builder again. Weights the user trained are a state_dict of the plain model; they are
loaded before conversion (conversion adds the masks and drops nothing but the ReLU modules, which hold no state).
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
import weakref
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from ..errors import FastmaskError

TORCHVISION_PREFIX = "torchvision:"
# Activations that are not ReLU: left as they are (they are not ReLU sites), counted so the run can say so.
OTHER_ACTIVATIONS = {nn.ReLU6: "ReLU6", nn.GELU: "GELU", nn.Hardswish: "Hardswish", nn.SiLU: "SiLU",
                     nn.Hardsigmoid: "Hardsigmoid", nn.Sigmoid: "Sigmoid", nn.Tanh: "Tanh", nn.LeakyReLU: "LeakyReLU",
                     nn.ELU: "ELU", nn.Mish: "Mish", nn.PReLU: "PReLU"}
OTHER_FUNCTIONS = {F.relu6: "ReLU6", F.gelu: "GELU", F.hardswish: "Hardswish", F.silu: "SiLU",
                   F.hardsigmoid: "Hardsigmoid", torch.sigmoid: "Sigmoid", torch.tanh: "Tanh",
                   F.leaky_relu: "LeakyReLU", F.elu: "ELU", F.mish: "Mish"}


class ConvertedModel(nn.Module):
    """A converted model (its torch.fx GraphModule as `net`) and its spec. The wrapper exists because a GraphModule's
    deepcopy keeps only its modules and graph, and every copy (teachers, --method both) must keep the spec.

    Like fastmask's own models it exposes stem(x), blocks and head(x): the graph cut at every point where a single
    tensor is all that flows on (see stage_split), so scoring runs the stages before the first site a candidate
    touches once instead of once per candidate. The stages share the model's modules; none holds state of its own."""

    def __init__(self, net: torch.fx.GraphModule, spec: dict):
        super().__init__()
        self.net = net
        self.fastmask_spec = dict(spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _stages(self) -> list[nn.Module]:
        stages = _STAGES.get(self.net)
        if stages is None:
            stages = _STAGES[self.net] = stage_split(self.net)
        return stages

    @property
    def blocks(self) -> list[nn.Module]:
        stages = self._stages()
        return stages[1:-1] if len(stages) > 2 else []

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return self._stages()[0](x)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return self._stages()[-1](x)


# Stages per GraphModule, made on first use; weak keys, so a model's stages go with it (a deepcopy gets its own).
_STAGES: "weakref.WeakKeyDictionary[torch.fx.GraphModule, list[nn.Module]]" = weakref.WeakKeyDictionary()


def stage_split(net: torch.fx.GraphModule) -> list[nn.Module]:
    """net's graph as a chain of GraphModules, each taking one tensor and returning one: cut after every node whose
    output is then the only value still to be read. The chain's composition is net's forward, node for node, on the
    same module objects. Attributes the graph reads (a parameter or buffer used in an op) are read again in each
    stage that uses them, so no stage takes more than the one tensor."""
    nodes = [node for node in net.graph.nodes if node.op != "get_attr"]
    position = {node: i for i, node in enumerate(nodes)}
    expiring: dict[int, list] = {}
    for node in nodes:
        last_use = max((position[u] for u in node.users if u in position), default=position[node])
        expiring.setdefault(last_use, []).append(node)
    live, stages = set(), [[]]
    for i, node in enumerate(nodes):
        if node.op not in ("placeholder", "output"):
            stages[-1].append(node)
        if node.users:
            live.add(node)
        for done in expiring.get(i, []):
            live.discard(done)
        if node.op not in ("placeholder", "output") and live == {node} and nodes[i + 1].op != "output":
            stages.append([])
    placeholders = [node for node in nodes if node.op == "placeholder"]
    output = nodes[-1]
    if len(stages) == 1 or len(placeholders) != 1:
        return [net]
    result, incoming = [], placeholders[0]
    for index, members in enumerate(stages):
        graph = torch.fx.Graph()
        env = {incoming: graph.placeholder(incoming.name if index == 0 else "x")}

        def read(node: torch.fx.Node, env: dict = env, graph: torch.fx.Graph = graph) -> torch.fx.Node:
            if node not in env:  # an attribute: read where it is used (the cut leaves no other value behind)
                assert node.op == "get_attr", f"stage_split: {node} crosses a cut"
                env[node] = graph.get_attr(node.target)
            return env[node]

        for node in members:
            env[node] = graph.node_copy(node, read)
        if index == len(stages) - 1:
            graph.output(torch.fx.node.map_arg(output.args[0], read))
        else:
            graph.output(env[members[-1]])
            incoming = members[-1]
        result.append(torch.fx.GraphModule(net, graph))
    return result


def is_builtin(arch: Optional[str]) -> bool:
    from . import ARCHS

    return arch is None or arch in ARCHS


def _split(arch: str) -> tuple[str, str]:
    target, sep, function = arch.rpartition(":")
    if not sep or not target or not function:
        from . import ARCHS

        raise FastmaskError(f"unknown arch {arch!r}; choose one of {', '.join(sorted(ARCHS))}, torchvision:<name> "
                            "(e.g. torchvision:resnet50), or your builder as path/to/file.py:function or "
                            "package.module:function")
    return target, function


def canonical(arch: str) -> str:
    """The arch as checkpoints and run folders store it: a builder file by its absolute path, so the model can be
    rebuilt from any working directory; other forms unchanged."""
    if is_builtin(arch) or arch.startswith(TORCHVISION_PREFIX):
        return arch
    target, function = _split(arch)
    if target.endswith(".py"):
        return f"{Path(target).expanduser().resolve()}:{function}"
    return arch


def resolve_builder(arch: str) -> Callable[..., nn.Module]:
    """The callable an arch string names; FastmaskError in one line when it cannot be imported."""
    if arch.startswith(TORCHVISION_PREFIX):
        name = arch[len(TORCHVISION_PREFIX):]
        import torchvision.models

        try:
            return torchvision.models.get_model_builder(name)
        except ValueError:
            raise FastmaskError(f"--arch {arch}: torchvision has no model {name!r} (torchvision.models.list_models() "
                                "names them, e.g. resnet50, vgg11_bn, densenet121)") from None
    target, function = _split(arch)
    if target.endswith(".py"):
        path = Path(target).expanduser()
        if not path.is_file():
            raise FastmaskError(f"--arch {arch}: the builder file {path} does not exist")
        name = "fastmask_builder_" + hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]
        module = sys.modules.get(name)
        if module is None:
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            try:
                spec.loader.exec_module(module)
            except Exception as err:
                raise FastmaskError(f"--arch {arch}: the builder file {path} could not be imported "
                                    f"({type(err).__name__}: {err})") from err
            sys.modules[name] = module
    else:
        try:
            module = importlib.import_module(target)
        except Exception as err:
            raise FastmaskError(f"--arch {arch}: the module {target} could not be imported "
                                f"({type(err).__name__}: {err})") from err
    builder = getattr(module, function, None)
    if not callable(builder):
        raise FastmaskError(f"--arch {arch}: {target} has no function {function!r}")
    return builder


def build_plain(arch: str, num_classes: int) -> nn.Module:
    """The unconverted model the arch's builder returns, for `num_classes` classes."""
    builder = resolve_builder(arch)
    try:
        if arch.startswith(TORCHVISION_PREFIX):
            model = builder(weights=None, num_classes=num_classes)
        else:
            parameters = inspect.signature(builder).parameters.values()
            takes_classes = any(p.name == "num_classes" or p.kind is p.VAR_KEYWORD for p in parameters)
            model = builder(num_classes=num_classes) if takes_classes else builder()
    except FastmaskError:
        raise
    except Exception as err:
        raise FastmaskError(f"--arch {arch}: the builder raised {type(err).__name__}: {err}") from err
    if not isinstance(model, nn.Module):
        raise FastmaskError(f"--arch {arch}: the builder returned a {type(model).__name__}, not an nn.Module")
    return model


def other_activations(model: nn.Module) -> dict[str, int]:
    """Activation call sites that are not ReLU (ReLU6, GELU, Hardswish, SiLU, ...), by kind: they stay as they are."""
    net = model.net if isinstance(model, ConvertedModel) else model
    counts: dict[str, int] = {}
    if isinstance(net, torch.fx.GraphModule):
        modules = dict(net.named_modules())
        for node in net.graph.nodes:
            kind = None
            if node.op == "call_module":
                kind = OTHER_ACTIVATIONS.get(type(modules.get(node.target)))
            elif node.op == "call_function":
                kind = OTHER_FUNCTIONS.get(node.target)
            if kind:
                counts[kind] = counts.get(kind, 0) + 1
    else:
        for module in net.modules():
            kind = OTHER_ACTIVATIONS.get(type(module))
            if kind:
                counts[kind] = counts.get(kind, 0) + 1
    return counts


def convert_plain(model: nn.Module, arch: str, num_classes: int, image_size: int, in_channels: int = 3,
                  polynomial: bool = False) -> ConvertedModel:
    """Checks that `model` takes in_channels x image_size x image_size images and gives num_classes logits, then
    converts it."""
    from ..nn import convert

    example = torch.zeros(2, in_channels, image_size, image_size)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(example)
    except Exception as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise FastmaskError(f"{arch} cannot take {in_channels}x{image_size}x{image_size} images ({first}); use an "
                            "--image-size or dataset the model accepts") from err
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise FastmaskError(f"{arch} returns {shape} for 2 images; fastmask needs logits shaped [batch, classes]")
    if out.shape[1] != num_classes:
        raise FastmaskError(f"{arch} outputs {out.shape[1]} classes but the data has {num_classes}; give the builder "
                            "a num_classes argument or match its head to the data")
    try:
        net = convert(model, example[:1], polynomial=polynomial)
    except FastmaskError as err:
        raise FastmaskError(f"{arch}: {err}") from None
    spec = {"arch": arch, "num_classes": int(num_classes), "image_size": int(image_size), "width": None,
            "in_channels": int(in_channels), "polynomial": bool(polynomial), "converted": True}
    return ConvertedModel(net, spec)


def build(arch: str, num_classes: int, image_size: int, in_channels: int = 3, polynomial: bool = False,
          weights: Optional[dict] = None, weights_name: str = "") -> ConvertedModel:
    """The arch's model for this data, with `weights` (a state_dict of the plain model) when given, converted."""
    arch = canonical(arch)
    plain = build_plain(arch, num_classes)
    if weights is not None:
        load_plain_weights(plain, weights, weights_name or "the weights", arch)
    return convert_plain(plain, arch, num_classes, image_size, in_channels, polynomial)


def load_plain_weights(model: nn.Module, state: dict, name: str, arch: str, allow_missing: tuple = ()) -> None:
    """Loads a state_dict strictly; missing keys ending in one of `allow_missing` are allowed (masks of a built-in
    model default to all ReLUs). Mismatches name the first few keys."""
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # a shape mismatch
        lines = [line.strip() for line in str(err).splitlines() if "size mismatch" in line]
        raise FastmaskError(f"{name} do not fit {arch}: {lines[0] if lines else str(err).splitlines()[0]}") from err
    missing = [k for k in missing if not (allow_missing and k.endswith(allow_missing))]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys ({', '.join(unexpected[:3])}"
                         f"{', ...' if len(unexpected) > 3 else ''})")
        raise FastmaskError(f"{name} do not fit {arch}: {'; '.join(parts)}")
