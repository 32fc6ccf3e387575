"""One party of a two-party SecretFlow SPU run of an exported model; runs INSIDE the SPU environment.

This file is started as a script by fastmask.pi.spu_runtime with the SPU environment's python (see fastmask.pi.spu_env):
it imports only the standard library, numpy, onnx, jax and spu, never torch or the rest of fastmask, whose pins
differ. It holds:
- lower_onnx: a small ONNX-to-JAX lowering of the ops fastmask.pi.export emits (Conv, Gemm, Relu, Gather with
  constant indices, Concat, Reshape, Flatten, Mul, Add, GlobalAveragePool, Constant); any other op is refused by name.
- `plain`: the lowering run in plaintext JAX (to check it against onnxruntime).
- `party`: one party of the run described by <work>/plan.json.

A run, per job (one .onnx file in one weight mode):
- Party 0 (the server) lowers the ONNX graph, compiles it with SPU's JAX frontend and sends the executable to party 1
  (the client), who never reads the ONNX file. In "public" mode the weights are constants of the executable (known to
  both); in "secret" mode they are secret inputs shared by the server, once per job.
- Both build a fresh SPU runtime (so each job pays its own protocol setup) and run it 1 + count times, one image per
  run: first a warm-up on an all-zero image, then the client's images. For each run the client secret-shares its
  image and sends the server its share; after the run the server sends the client its share of the logits, and only
  the client reconstructs them.
- Link bytes and send actions of each run come from SPU's own counters, which it prints at the end of every run when
  RuntimeConfig.enable_pphlo_profile is on ("Link details: total send bytes B, recv bytes R, send actions A, ...");
  fastmask.pi.spu_runtime reads them from this party's log. The input and output shares and the weight shares are
  sent outside SPU's runs, so this party counts them itself and writes them, with the seconds of each run, to
  <work>/party<rank>.json. The client writes the logits of job i to <work>/logits<i>.npy.
"""
from __future__ import annotations

import argparse
import json
import pickle
import sys
import time
from pathlib import Path

import numpy as np

SERVER, CLIENT = 0, 1
WORLD_SIZE = 2
SUPPORTED_OPS = ("Conv", "Gemm", "Relu", "Gather", "Concat", "Reshape", "Flatten", "Mul", "Add", "GlobalAveragePool",
                 "Constant")


class UnsupportedGraph(Exception):
    """The ONNX graph holds something this lowering does not translate."""


# ---- ONNX -> JAX ----------------------------------------------------------------------------------------------------
class Lowered:
    """An ONNX graph as a JAX function: forward(x, weights) -> logits, with weights {initializer name: float array}
    (pass numpy arrays to make them constants of a traced function, traced arrays to make them its inputs)."""

    def __init__(self, path: str):
        import onnx
        from onnx import numpy_helper

        model = onnx.load(path)
        graph = model.graph
        unsupported = sorted({node.op_type for node in graph.node} - set(SUPPORTED_OPS))
        if unsupported:
            raise UnsupportedGraph(f"{path} holds ONNX ops the SPU lowering does not translate: "
                                   f"{', '.join(unsupported)}; it translates {', '.join(SUPPORTED_OPS)}")
        self.weights = {t.name: numpy_helper.to_array(t).astype(np.float32) for t in graph.initializer}
        initializer_names = set(self.weights)
        inputs = [i for i in graph.input if i.name not in initializer_names]
        if len(inputs) != 1 or len(graph.output) != 1:
            raise UnsupportedGraph(f"{path} must have one input and one output, not {len(inputs)} and "
                                   f"{len(graph.output)}")
        self.input_name, self.output_name = inputs[0].name, graph.output[0].name
        self.nodes = [(node.op_type, list(node.input), list(node.output),
                       {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}) for node in graph.node]
        for op, _, _, attrs in self.nodes:
            if op == "Constant":
                attrs["value"] = numpy_helper.to_array(attrs["value"])

    def forward(self, x, weights):
        import jax.numpy as jnp
        from jax import lax

        env = dict(weights)
        env[self.input_name] = x
        for op, inputs, outputs, attrs in self.nodes:
            args = [env[name] if name else None for name in inputs]
            if op == "Constant":
                y = attrs["value"]
            elif op == "Conv":
                w, b = args[1], (args[2] if len(args) > 2 else None)
                spatial = len(w.shape) - 2
                pads = list(attrs.get("pads", [0] * 2 * spatial))
                y = lax.conv_general_dilated(
                    args[0], w, window_strides=list(attrs.get("strides", [1] * spatial)),
                    padding=[(pads[i], pads[i + spatial]) for i in range(spatial)],
                    rhs_dilation=list(attrs.get("dilations", [1] * spatial)),
                    dimension_numbers=("NCHW", "OIHW", "NCHW"), feature_group_count=int(attrs.get("group", 1)))
                if b is not None:
                    y = y + jnp.reshape(b, (1, -1) + (1,) * spatial)
            elif op == "Gemm":
                a, b = args[0], args[1]
                if attrs.get("transA", 0):
                    a = _transpose(a)
                if attrs.get("transB", 0):
                    b = _transpose(b)
                y = float(attrs.get("alpha", 1.0)) * jnp.matmul(a, b)
                if len(args) > 2 and args[2] is not None:
                    y = y + float(attrs.get("beta", 1.0)) * args[2]
            elif op == "Relu":
                y = jnp.maximum(args[0], 0)
            elif op == "Gather":
                indices = args[1]
                if not isinstance(indices, np.ndarray):
                    raise UnsupportedGraph("Gather indices must be constants (public), as fastmask's export makes them")
                axis = int(attrs.get("axis", 0))
                size = args[0].shape[axis]
                indices = np.where(indices < 0, indices + size, indices).astype(np.int64)
                y = jnp.take(args[0], indices, axis=axis, mode="clip")  # in bounds: clip never acts
            elif op == "Concat":
                y = jnp.concatenate(args, axis=int(attrs["axis"]))
            elif op == "Reshape":
                shape = [int(s) for s in np.asarray(args[1]).reshape(-1)]
                if not attrs.get("allowzero", 0):
                    shape = [args[0].shape[i] if s == 0 else s for i, s in enumerate(shape)]
                y = jnp.reshape(args[0], shape)
            elif op == "Flatten":
                axis = int(attrs.get("axis", 1))
                shape = args[0].shape
                y = jnp.reshape(args[0], (int(np.prod(shape[:axis])), int(np.prod(shape[axis:]))))
            elif op == "Mul":
                y = args[0] * args[1]
            elif op == "Add":
                y = args[0] + args[1]
            elif op == "GlobalAveragePool":
                y = jnp.mean(args[0], axis=tuple(range(2, len(args[0].shape))), keepdims=True)
            else:  # refused in __init__
                raise UnsupportedGraph(f"ONNX op {op} is not translated")
            env[outputs[0]] = y
        return env[self.output_name]


def _transpose(a):
    """A constant is transposed here, in numpy: SPU 0.9.5 computes a jnp.transpose of a constant wrongly (its result
    keeps the layout of the untransposed array), which turned the classifier's logits into nonsense."""
    import jax.numpy as jnp

    return np.ascontiguousarray(a.T) if isinstance(a, np.ndarray) else jnp.transpose(a)


def run_plain(onnx_path: str, inputs: np.ndarray) -> np.ndarray:
    """The lowering in plaintext JAX (float32): what SPU computes, without the secret sharing."""
    import jax.numpy as jnp

    lowered = Lowered(onnx_path)
    return np.asarray(lowered.forward(jnp.asarray(inputs, dtype=jnp.float32), lowered.weights))


# ---- one party ------------------------------------------------------------------------------------------------------
PROTOCOLS = {"cheetah": "CHEETAH", "semi2k": "SEMI2K"}


def runtime_config(protocol: str):
    import spu.libspu as libspu

    config = libspu.RuntimeConfig(protocol=getattr(libspu.ProtocolKind, PROTOCOLS[protocol]),
                                  field=libspu.FieldType.FM64)
    config.enable_pphlo_profile = True  # prints each run's link bytes and send actions
    if protocol == "semi2k":
        config.beaver_type = libspu.RuntimeConfig.BeaverType.TrustedFirstParty  # party 0 deals the triples
    return config


class Counted:
    """Bytes and send actions this party sends outside SPU's runs (shares in and out, the executable)."""

    def __init__(self, link):
        self.link, self.bytes, self.actions = link, 0, 0

    def send(self, peer: int, payload: bytes, count: bool = True) -> None:
        self.link.send(peer, payload)
        if count:
            self.bytes += len(payload)
            self.actions += 1

    def recv(self, peer: int) -> bytes:
        return self.link.recv(peer)

    def take(self) -> tuple[int, int]:
        counted = (self.bytes, self.actions)
        self.bytes = self.actions = 0
        return counted


def _pack(share) -> bytes:
    return pickle.dumps((bytes(share.meta), [bytes(c) for c in share.share_chunks]), protocol=4)


def _unpack(payload: bytes):
    import spu.libspu as libspu

    meta, chunks = pickle.loads(payload)
    share = libspu.Share()
    share.meta, share.share_chunks = meta, chunks
    return share


def _compile(lowered: Lowered, mode: str, image_shape: list[int]):
    import jax.numpy as jnp
    import spu.libspu as libspu
    from spu.utils import frontend

    names = sorted(lowered.weights)
    example = np.zeros([1, *image_shape], dtype=np.float32)
    if mode == "public":
        def fn(x):
            return lowered.forward(x, lowered.weights)
        args = [example]
    else:
        def fn(x, *ws):
            return lowered.forward(x, dict(zip(names, ws)))
        args = [example, *(lowered.weights[n] for n in names)]
    in_names = ["image"] + [f"weight{i}" for i in range(len(args) - 1)]
    executable, _ = frontend.compile(frontend.Kind.JAX, fn, [jnp.asarray(a) for a in args], {}, in_names,
                                     [libspu.Visibility.VIS_SECRET] * len(args),
                                     lambda outs: [f"out{i}" for i in range(len(outs))])
    return executable, [lowered.weights[n] for n in names]


def party(rank: int, work: Path) -> None:
    import spu
    import spu.libspu as libspu

    plan = json.loads((work / "plan.json").read_text())
    config = runtime_config(plan["protocol"])
    desc = libspu.link.Desc()
    desc.id = "fastmask-pi"
    desc.recv_timeout_ms = int(plan["timeout"] * 1000)
    desc.connect_retry_times = 120
    desc.connect_retry_interval_ms = 500
    for r, port in enumerate(plan["ports"]):
        desc.add_party(f"party{r}", f"127.0.0.1:{port}")
    link = libspu.link.create_brpc(desc, rank)
    wire = Counted(link)
    io = spu.Io(WORLD_SIZE, config)
    peer = 1 - rank
    count, image_shape = plan["count"], plan["image_shape"]
    images = np.load(work / "client_images.npy").astype(np.float32) if rank == CLIENT else None
    report = []
    for index, job in enumerate(plan["jobs"]):
        weights = []
        if rank == SERVER:
            executable, weights = _compile(Lowered(job["onnx"]), job["mode"], image_shape)
            wire.send(peer, executable.SerializeToString(), count=False)  # the program, not protocol traffic
        else:
            executable = libspu.Executable()
            executable.ParseFromString(wire.recv(peer))
        runtime = spu.Runtime(link, config)
        weight_names = list(executable.input_names[1:])
        if weight_names:  # secret weights: the server shares them once per job
            if rank == SERVER:
                for name, value in zip(weight_names, weights):
                    shares = io.make_shares(value, libspu.Visibility.VIS_SECRET)
                    wire.send(peer, _pack(shares[CLIENT]))
                    runtime.set_var(name, shares[SERVER])
            else:
                for name in weight_names:
                    runtime.set_var(name, _unpack(wire.recv(peer)))
        weight_bytes, weight_actions = wire.take()
        runs = []
        client_logits = []
        for step in range(1 + count):
            link.barrier()
            started = time.perf_counter()
            if rank == CLIENT:
                x = np.zeros([1, *image_shape], np.float32) if step == 0 else images[step - 1:step]
                shares = io.make_shares(x, libspu.Visibility.VIS_SECRET)
                wire.send(peer, _pack(shares[SERVER]))
                runtime.set_var(executable.input_names[0], shares[CLIENT])
            else:
                runtime.set_var(executable.input_names[0], _unpack(wire.recv(peer)))
            runtime.run(executable)
            out = runtime.get_var(executable.output_names[0])
            if rank == SERVER:
                wire.send(peer, _pack(out))
            else:
                logits = io.reconstruct([_unpack(wire.recv(peer)), out])
                if step > 0:
                    client_logits.append(np.asarray(logits, dtype=np.float32).reshape(1, -1))
            seconds = time.perf_counter() - started
            sent_bytes, sent_actions = wire.take()
            runs.append({"seconds": seconds, "io_bytes": sent_bytes, "io_actions": sent_actions})
            runtime.del_var(executable.input_names[0])
            runtime.del_var(executable.output_names[0])
        report.append({"weight_bytes": weight_bytes, "weight_actions": weight_actions, "runs": runs})
        if rank == CLIENT:
            np.save(work / f"logits{index}.npy", np.concatenate(client_logits))
        del runtime
    link.barrier()
    (work / f"party{rank}.json").write_text(json.dumps(report))
    link.stop_link()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="one party of fastmask's SPU run, or the lowering in plain JAX")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("party")
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--work", type=Path, required=True)
    q = sub.add_parser("plain")
    q.add_argument("--onnx", required=True)
    q.add_argument("--inputs", required=True, help=".npy of float32 [N, C, H, W]")
    q.add_argument("--out", required=True, help=".npy to write the logits to")
    sub.add_parser("probe", help="print the versions of spu, jax, numpy and onnx")
    args = parser.parse_args(argv)
    try:
        if args.command == "party":
            party(args.rank, args.work)
        elif args.command == "plain":
            np.save(args.out, run_plain(args.onnx, np.load(args.inputs)))
        else:
            import jax
            import onnx
            import spu

            print(json.dumps({"spu": spu.__version__, "jax": jax.__version__, "numpy": np.__version__,
                              "onnx": onnx.__version__, "python": sys.version.split()[0]}))
    except UnsupportedGraph as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
