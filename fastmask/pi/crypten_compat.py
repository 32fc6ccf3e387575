"""The one place that makes CrypTen 0.4.1 (its latest release, 2022) run on today's torch.

What it works around, each checked against torch 2.14:
- `import crypten` imports torch.onnx._internal.registration, which torch moved to
  torch.onnx._internal.torchscript_exporter.registration: the old name is aliased to the new module.
- crypten.nn.from_pytorch needs torch's legacy ONNX exporter; fastmask never calls it: it imports its own ONNX file
  with crypten.nn.from_onnx, whose graph holds only ops CrypTen reads (see fastmask.pi.export).
- CrypTen's wheel depends on the deprecated `sklearn` placeholder, which installs only with
  SKLEARN_ALLOW_DEPRECATED_SKLEARN_PACKAGE_INSTALL=True (an install-time matter; nothing here).
- With few cores, two parties each running torch's full thread pool can stall each other: every party process gets
  OMP_NUM_THREADS=1 (party_environment) and torch.set_num_threads(1).
- crypten.nn.Graph.forward looks for the next computable node and for values to free by scanning the whole graph
  after every node: its Python overhead grows with the square of the node count, and a masked model's kept-only
  lowering adds a few nodes per site (a 16-site resnet18's graph grows from 88 to 248 nodes: 0.25 s per image of
  scanning on a 2-core CPU, more than its ReLUs cost). `linear_graph_forward` evaluates the same nodes in the same
  order, freeing each value after its last reader, in time linear in the graph; the protocol, its messages and its
  bytes are unchanged (the tests compare them).
- Every CrypTen op reads its settings through OmegaConf (crypten.config.cfg), some 700 lookups per image of a small
  resnet at tens of microseconds each: more than the op itself on small tensors, and a kept-only lowering has a few
  more ops per site than a plain Relu. `plain_settings` swaps the settings tree for plain attributes once the party
  has set them (temp_override still works), so an op costs what it computes.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import sys
import types

from ..errors import FastmaskError

_OLD_REGISTRATION = "torch.onnx._internal.registration"
_NEW_REGISTRATION = "torch.onnx._internal.torchscript_exporter.registration"


def import_crypten():
    """crypten and crypten.nn, importable on this torch; FastmaskError when CrypTen is not installed."""
    try:
        importlib.import_module(_OLD_REGISTRATION)
    except ImportError:
        try:
            sys.modules[_OLD_REGISTRATION] = importlib.import_module(_NEW_REGISTRATION)
        except ImportError:
            pass  # neither exists: let crypten's own import say what is missing
    try:
        import crypten
        import crypten.nn  # noqa: F401
    except ImportError as err:
        raise FastmaskError(f"CrypTen is not usable here ({err}); install it with "
                            "SKLEARN_ALLOW_DEPRECATED_SKLEARN_PACKAGE_INSTALL=True pip install -e .[pi]") from err
    if crypten.nn.Graph.forward is not linear_graph_forward:
        global quadratic_graph_forward
        quadratic_graph_forward = crypten.nn.Graph.forward
        crypten.nn.Graph.forward = linear_graph_forward
    return crypten


quadratic_graph_forward = None  # CrypTen's own Graph.forward, kept for the test that compares the two


def _plain(node):
    from omegaconf import DictConfig, ListConfig

    if isinstance(node, DictConfig):
        return types.SimpleNamespace(**{key: _plain(node[key]) for key in node})
    if isinstance(node, ListConfig):
        return [_plain(item) for item in node]
    return node


def plain_settings(cfg) -> None:
    """Replaces CrypTen's settings tree (OmegaConf) by plain attributes with the same values, in this process."""
    cfg.config = _plain(cfg.config)

    @contextlib.contextmanager
    def temp_override(override: dict):
        saved = []
        try:
            for dotted, value in override.items():
                *path, name = dotted.split(".")
                node = cfg.config
                for key in path:
                    node = getattr(node, key)
                saved.append((node, name, getattr(node, name)))
                setattr(node, name, value)
            yield
        finally:
            for node, name, value in reversed(saved):
                setattr(node, name, value)

    object.__setattr__(cfg, "temp_override", temp_override)


def _schedule(graph) -> tuple[list[str], dict[str, int]]:
    """The order CrypTen's Graph.forward computes nodes in (the first node, in insertion order, whose inputs are all
    computed), and each value's last reader's position in it. Cached on the graph: it does not change between
    images."""
    cached = getattr(graph, "_fastmask_schedule", None)
    if cached is not None and cached[0] is graph._graph:
        return cached[1], cached[2]
    computed = set(graph.input_names)
    pending = list(graph._graph)
    order = []
    while pending:
        name = next((n for n in pending if all(i in computed for i in graph._graph[n])), None)
        if name is None:
            raise ValueError("nn.Graph.forward() failed. Is graph unconnected?")
        pending.remove(name)
        order.append(name)
        computed.add(name)
        computed.update(getattr(graph._modules[name], "_output_names", None) or ())
    last_use = {}
    for position, name in enumerate(order):
        for value in graph._graph[name]:
            last_use[value] = position
    graph._fastmask_schedule = (graph._graph, order, last_use)
    return order, last_use


def linear_graph_forward(self, *args):
    """crypten.nn.Graph.forward in linear time: the same nodes in the same order, each value freed after its last
    reader, the outputs returned as soon as they are all computed."""
    if len(args) != len(self.input_names):
        raise ValueError(f"Expected {len(self.input_names)} inputs but received {len(args)}.")
    order, last_use = _schedule(self)
    values = dict(zip(self.input_names, args))
    wanted = set(self.output_names)
    for position, name in enumerate(order):
        inputs = [values[i] for i in self._graph[name]]
        module = self._modules[name]
        output = module(inputs[0] if len(inputs) == 1 else inputs)
        names = getattr(module, "_output_names", None)
        if names is None or len(names) == 1:
            values[name] = output
        else:
            values.update(zip(names, output))
        if wanted.issubset(values):
            result = [values[o] for o in self.output_names]
            return result[0] if len(result) == 1 else tuple(result)
        for i in self._graph[name]:
            if last_use.get(i) == position and i not in wanted:
                values.pop(i, None)
    raise ValueError("nn.Graph.forward() failed. Is graph unconnected?")


def party_environment(rank: int, world_size: int, rendezvous: str) -> dict:
    """The environment of one party process: CrypTen's rendezvous settings and one thread per party."""
    env = dict(os.environ)
    env.update({"WORLD_SIZE": str(world_size), "RANK": str(rank), "RENDEZVOUS": rendezvous,
                "DISTRIBUTED_BACKEND": "gloo", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    return env
