"""What one private inference of a masked model costs: bytes, rounds and latency, per two-party protocol and network.

latency = local compute + rounds x round-trip time + bytes / bandwidth

A model's cost follows from its Workload (what the protocol pays for: ReLUs kept per site, secret products of the
polynomial replacement, linear layers) and a Protocol's unit costs:
- bytes  = fixed + per kept ReLU + per secret product + (secret weights) per linear-layer element;
- rounds = fixed + per site that still holds a ReLU + per site with secret products + (secret weights) per linear
  layer. A site whose mask is all zero costs no round: emptying a site is what buys latency on a slow network, while
  the last few ReLUs of a site are nearly free in bytes.
The measured protocols' unit costs are fitted from fastmask-pi runs (bench/pi_cost.py re-fits them and prints the
residuals; bench/PI.md holds the fit); the garbled-circuit profile is taken from published figures, cited below.
`fastmask-pi --predict` prints these predictions without running the two parties.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import torch
import torch.nn as nn

from .errors import FastmaskError


# ---- networks ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Network:
    """A link between client and server: bandwidth in megabits per second, round-trip time in milliseconds."""

    name: str
    bandwidth_mbit: float
    rtt_ms: float

    def __str__(self) -> str:
        return f"{self.name} ({self.bandwidth_mbit:g} Mbit/s, {self.rtt_ms:g} ms RTT)"


# A data-centre LAN and a cross-country WAN, the two settings PI evaluations commonly report; override with --network
# BANDWIDTH_MBIT,RTT_MS.
NETWORKS = {"lan": Network("lan", 1000.0, 0.5), "wan": Network("wan", 100.0, 40.0)}


def parse_network(text: str) -> Network:
    """'lan', 'wan', or 'BANDWIDTH_MBIT,RTT_MS' (e.g. '200,20')."""
    key = str(text).strip().lower()
    if key in NETWORKS:
        return NETWORKS[key]
    parts = key.split(",")
    try:
        bandwidth, rtt = (float(p) for p in parts)
    except ValueError:
        raise FastmaskError(f"--network takes {', '.join(NETWORKS)} or BANDWIDTH_MBIT,RTT_MS (e.g. 200,20); got "
                            f"{text!r}") from None
    if not (bandwidth > 0 and rtt >= 0 and math.isfinite(bandwidth) and math.isfinite(rtt)):
        raise FastmaskError(f"--network needs a bandwidth > 0 Mbit/s and a round-trip time >= 0 ms; got {text!r}")
    return Network(f"{bandwidth:g}Mbit/{rtt:g}ms", bandwidth, rtt)


# ---- protocols --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Protocol:
    """Unit costs of one two-party protocol in one weight mode, for one image. `rounds` are communication rounds (for
    a runtime that reports send actions instead, those). Seconds are the local compute of the two parties on one
    CPU core each, fitted from localhost runs (None where not measured: latency then counts communication only)."""

    name: str
    runtime: str
    dealer: bool
    secret_weights: bool
    bytes_per_relu: float
    rounds_per_site: float
    bytes_fixed: float = 0.0
    rounds_fixed: float = 0.0
    bytes_per_product: float = 0.0
    rounds_per_product_site: float = 0.0
    bytes_per_linear_element: float = 0.0
    rounds_per_linear_layer: float = 0.0
    bytes_per_linear_output: float = 0.0
    bytes_per_site: float = 0.0
    bytes_per_io_element: float = 0.0  # the input's shares and the logits' shares, per element
    # Rounds per message a conv or linear layer sends, its output split into messages of at most this many elements
    # (0: layers send nothing of their own)
    rounds_per_linear_message: float = 0.0
    linear_message_elements: int = 0
    rounds_per_relu: float = 0.0
    setup_bytes: float = 0.0
    offline_bytes_per_relu: float = 0.0
    seconds_fixed: Optional[float] = None
    seconds_per_relu: float = 0.0
    seconds_per_site: float = 0.0
    source: str = ""


# CrypTen 0.4.1, two processes on localhost, one image at a time (fastmask.pi.two_party), fitted by bench/pi_cost.py
# on three resnet18 models with different masks (bench/PI.md: every residual of bytes and rounds is 0). Public
# weights: 464 bytes per kept ReLU, 9 rounds per site holding one, 80 bytes and 1 round to reveal the logits; a
# secret product (x * x of the polynomial) costs 32 bytes and 1 round per site. The compute seconds (both parties,
# one core each, localhost) were fitted on a 2-core x86-64 CPU shared with other work: they vary with the machine
# and weigh little on a WAN, where the rounds dominate. Secret weights add, per conv or
# linear layer, 1 round and 16 bytes per element of its input and weight (Beaver: both parties open x - a and w - b).
CRYPTEN_PUBLIC = Protocol(
    name="crypten-public", runtime="crypten", dealer=True, secret_weights=False, bytes_per_relu=464.0,
    rounds_per_site=9.0, bytes_fixed=80.0, rounds_fixed=1.0, bytes_per_product=32.0, rounds_per_product_site=1.0,
    seconds_fixed=0.0, seconds_per_relu=2.2e-5, seconds_per_site=0.053,
    source="fitted from CrypTen 0.4.1 runs (bench/pi_cost.py, bench/PI.md)")
CRYPTEN_SECRET = dataclasses.replace(
    CRYPTEN_PUBLIC, name="crypten-secret", secret_weights=True, bytes_per_linear_element=16.0,
    rounds_per_linear_layer=1.0, bytes_per_product=63.5, rounds_per_product_site=2.0, seconds_fixed=0.075,
    seconds_per_relu=0.0, seconds_per_site=0.067)

# Garbled circuits for the ReLUs and secret sharing for the linear layers, server as garbler (Delphi's protocol).
# Per-ReLU figures from the measurements of Delphi's code in Garimella et al., "Characterizing and Optimizing End-to-
# End Systems for Private Inference", ASPLOS 2023, artifact github.com/kvgarimella/cryptonite,
# simulator/experiments/utils/cifar10_server_garbler_utils_r18.py (ResNet-18 on CIFAR-10, 557,056 ReLUs; per ReLU
# = their totals / 557,056): online 1,184 bytes (the ReLU layers' messages) and 18.3 us of client compute; offline
# 17,072 bytes of garbled tables + 2,016 of OT extension. The rounds per ReLU layer are constant in a garbled
# circuit; the figure of 2 (labels by OT, output shares) is this profile's assumption, not a measurement.
GC = Protocol(name="gc-delphi", runtime="published", dealer=False, secret_weights=False, bytes_per_relu=1184.0,
              rounds_per_site=2.0, bytes_fixed=0.0, rounds_fixed=1.0, offline_bytes_per_relu=17072.0 + 2016.0,
              seconds_fixed=0.0, seconds_per_relu=18.3e-6,
              source="published: Garimella et al., ASPLOS 2023 (Delphi's code measured); rounds assumed")

# SecretFlow SPU 0.9.5, Cheetah (no dealer), FM64, public weights, two processes on localhost (fastmask.pi.
# spu_runtime), fitted by `bench/pi_cost.py --runtime spu-cheetah` at widths 4 and 8 (bench/PI.md: the ReLU-only
# models within 2%, both widths). SPU reports send actions, not rounds: `rounds` here are send actions: 40 per site
# that holds a ReLU, whatever its size, 2 per conv or linear layer and 2,048 elements of its output (its truncation,
# one message each way), 4 fixed. Bytes are one image's steady run: 98 per kept ReLU, 290 per site holding one, 3 per
# conv or linear output element (Cheetah truncates every product of fixed-point values), the rest fixed, and 8 per
# element of the image's and the logits' shares (FM64). Cheetah now and then also refills its silent-OT pool (about
# 0.3 MB for a run of ReLUs, rarely); the polynomial's secret products use so many OTs that it refills every other
# image, so their 409 bytes each are a median that single images miss by up to 40%. The OT setup is one-time
# (setup_bytes).
SPU_CHEETAH = Protocol(
    name="spu-cheetah-public", runtime="spu-cheetah", dealer=False, secret_weights=False, bytes_per_relu=98.2,
    rounds_per_site=40.0, bytes_per_site=290.0, bytes_fixed=1172.0, rounds_fixed=4.0, bytes_per_linear_output=3.0,
    bytes_per_io_element=8.0, rounds_per_linear_message=2.0, linear_message_elements=2048,
    bytes_per_product=409.0, rounds_per_product_site=8.0, setup_bytes=1.47e6,
    source="fitted from SecretFlow SPU 0.9.5 Cheetah runs (bench/pi_cost.py --runtime spu-cheetah, bench/PI.md)")

# The protocols predictions are made for: each fitted from its runs within 5% (CrypTen, SPU Cheetah's ReLUs) or
# cited (gc-delphi).
PROTOCOLS: dict[str, Protocol] = {p.name: p for p in (CRYPTEN_PUBLIC, CRYPTEN_SECRET, SPU_CHEETAH, GC)}
# Starting points for bench/pi_cost.py's fits.
FIT_STARTS: dict[str, Protocol] = dict(PROTOCOLS)
DEFAULT_PROTOCOL = "crypten-public"


def get_protocol(name: str) -> Protocol:
    if name not in PROTOCOLS:
        raise FastmaskError(f"--protocol takes {', '.join(PROTOCOLS)}; got {name!r}")
    return PROTOCOLS[name]


# ---- workloads --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LinearLayer:
    """One conv or linear layer, per image: its input's and weight's element counts and its multiply-accumulates."""

    name: str
    input_elements: int
    weight_elements: int
    macs: int
    output_elements: int = 0


@dataclass(frozen=True)
class Workload:
    """What a protocol pays for in one inference: kept ReLUs per site, secret products per site (the polynomial's
    x * x on its removed positions), and the linear layers."""

    kept: tuple[int, ...]
    products: tuple[int, ...]
    linear: tuple[LinearLayer, ...]
    site_names: tuple[str, ...] = ()
    input_elements: int = 0
    output_elements: int = 0

    @property
    def relus(self) -> int:
        return sum(self.kept)

    @property
    def sites(self) -> int:
        """Sites that still hold a ReLU: each costs its rounds."""
        return sum(1 for k in self.kept if k > 0)

    @property
    def product_sites(self) -> int:
        return sum(1 for p in self.products if p > 0)

    @property
    def macs(self) -> int:
        return sum(layer.macs for layer in self.linear)

    @property
    def io_elements(self) -> int:
        """One image's elements and its logits: what the parties share in and out."""
        return self.input_elements + self.output_elements

    def with_kept(self, kept: Sequence[int], products: Optional[Sequence[int]] = None) -> "Workload":
        """The same model with other per-site kept counts (and secret products) (for what-if costs in the search)."""
        if len(kept) != len(self.kept) or (products is not None and len(products) != len(self.kept)):
            raise FastmaskError(f"with_kept: counts for {len(kept)} sites, the model has {len(self.kept)}")
        return dataclasses.replace(self, kept=tuple(int(k) for k in kept),
                                   products=self.products if products is None else tuple(int(p) for p in products))


def _input_shape(model: nn.Module, image_shape: Optional[Sequence[int]]) -> tuple[int, ...]:
    if image_shape is not None:
        return tuple(int(s) for s in image_shape)
    spec = getattr(model, "fastmask_spec", None) or {}
    if "image_size" not in spec:
        raise FastmaskError("workload: the model has no fastmask spec; pass image_shape=(C, H, W)")
    return (int(spec.get("in_channels", 3)), int(spec["image_size"]), int(spec["image_size"]))


def quadratic_positions(site: nn.Module) -> torch.Tensor:
    """Bool, shaped like the site's mask: the positions whose replacement has a secret product (c2 != 0 in their
    channel; none for the identity). A removed such position costs the protocol a product."""
    mask = site.mask.detach()
    if site.coeffs is None:
        return torch.zeros_like(mask, dtype=torch.bool)
    return (site.coeffs.detach()[:, 2] != 0).view(-1, *([1] * (mask.dim() - 1))).expand_as(mask)


def workload(model: nn.Module, image_shape: Optional[Sequence[int]] = None) -> Workload:
    """The model's Workload, from its masks and one forward pass of a zero image (hooks record each conv and linear
    layer's sizes). Works for any model whose ReLU sites are MaskedReLU modules."""
    from .nn import masked_sites

    sites = masked_sites(model)
    kept = [int(site.mask.sum()) for _, site in sites]
    products = [int((~site.mask.detach() & quadratic_positions(site)).sum()) for _, site in sites]
    layers: list[LinearLayer] = []
    names = {id(m): n for n, m in model.named_modules()}

    def record(module, args, output):
        x = args[0]
        weight = module.weight
        if isinstance(module, nn.Conv2d):
            per_output = weight.shape[1] * weight.shape[2] * weight.shape[3]
            macs = int(output[0].numel()) * int(per_output)
        else:
            macs = int(output[0].numel()) * int(weight.shape[1])
        layers.append(LinearLayer(names.get(id(module), type(module).__name__), int(x[0].numel()),
                                  int(weight.numel()), macs, int(output[0].numel())))

    hooks = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = model.training
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    shape = _input_shape(model, image_shape)
    try:
        model.eval()
        with torch.no_grad():
            logits = model(torch.zeros(1, *shape, device=device))
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return Workload(tuple(kept), tuple(products), tuple(layers), tuple(n for n, _ in sites),
                    input_elements=int(math.prod(shape)), output_elements=int(logits[0].numel()))


# ---- predictions ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Cost:
    """One inference's predicted cost under a protocol: online bytes and rounds (what a user waits for), local
    compute seconds, the one-time setup bytes and the per-inference preprocessing (offline) bytes."""

    protocol: str
    bytes: float
    rounds: float
    seconds_compute: Optional[float]
    setup_bytes: float = 0.0
    offline_bytes: float = 0.0

    def latency(self, network: Network) -> float:
        """Seconds for one inference on `network`: local compute + rounds x RTT + bytes / bandwidth."""
        communication = self.rounds * network.rtt_ms / 1e3 + self.bytes * 8.0 / (network.bandwidth_mbit * 1e6)
        return communication + (self.seconds_compute or 0.0)


def predict(load: Workload, protocol: Protocol) -> Cost:
    """The protocol's bytes, rounds and local compute for one inference of the workload."""
    p = protocol
    bytes_ = (p.bytes_fixed + p.bytes_per_relu * load.relus + p.bytes_per_site * load.sites
              + p.bytes_per_product * sum(load.products)
              + p.bytes_per_linear_output * sum(layer.output_elements for layer in load.linear)
              + p.bytes_per_io_element * load.io_elements)
    rounds = (p.rounds_fixed + p.rounds_per_site * load.sites + p.rounds_per_relu * load.relus
              + p.rounds_per_product_site * load.product_sites)
    if p.linear_message_elements:
        rounds += p.rounds_per_linear_message * sum(math.ceil(layer.output_elements / p.linear_message_elements)
                                                    for layer in load.linear)
    if p.secret_weights:
        bytes_ += p.bytes_per_linear_element * sum(layer.input_elements + layer.weight_elements
                                                     for layer in load.linear)
        rounds += p.rounds_per_linear_layer * len(load.linear)
    seconds = None
    if p.seconds_fixed is not None:
        seconds = p.seconds_fixed + p.seconds_per_relu * load.relus + p.seconds_per_site * load.sites
    return Cost(p.name, bytes_, rounds, seconds, p.setup_bytes, p.offline_bytes_per_relu * load.relus)


def latency(load: Workload, protocol: Protocol, network: Network) -> float:
    return predict(load, protocol).latency(network)


def site_saving(protocol: Protocol, network: Network) -> tuple[float, float]:
    """(seconds a kept ReLU costs, seconds a site holding any ReLU costs) on the network: what the search weighs a
    removal by. Emptying a site saves the second on top of the first."""
    per_relu = (protocol.bytes_per_relu * 8.0 / (network.bandwidth_mbit * 1e6) + protocol.seconds_per_relu
                + protocol.rounds_per_relu * network.rtt_ms / 1e3)
    per_site = (protocol.rounds_per_site * network.rtt_ms / 1e3 + protocol.seconds_per_site
                + protocol.bytes_per_site * 8.0 / (network.bandwidth_mbit * 1e6))
    return per_relu, per_site


def summary(load: Workload, protocols: Sequence[str] = tuple(PROTOCOLS),
            networks: Mapping[str, Network] = NETWORKS) -> dict:
    """The cost columns of a report row: ReLUs, sites holding one, plaintext MACs, and per protocol its bytes,
    rounds and latency on each network."""
    row: dict = {"relus": load.relus, "sites": load.sites, "macs": load.macs, "protocols": {}}
    for name in protocols:
        cost = predict(load, get_protocol(name))
        row["protocols"][name] = {"bytes": round(cost.bytes), "rounds": round(cost.rounds, 2),
                                  **{f"{net}_seconds": round(cost.latency(network), 4)
                                     for net, network in networks.items()}}
    return row


# ---- fitting ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Measurement:
    """One measured run: the workload, its protocol name, and bytes, rounds and seconds per image."""

    load: Workload
    protocol: str
    bytes: float
    rounds: float
    seconds: Optional[float] = None


def _lstsq(rows: list[list[float]], values: list[float]) -> list[float]:
    a = torch.tensor(rows, dtype=torch.float64)
    b = torch.tensor(values, dtype=torch.float64).unsqueeze(1)
    return torch.linalg.lstsq(a, b, driver="gelsd").solution.squeeze(1).tolist()


def _non_negative_lstsq(rows: list[list[float]], values: list[float]) -> list[float]:
    """Least squares with every coefficient >= 0 (a unit cost is never negative; timings on a busy machine can make
    a plain fit say so): columns whose coefficient comes out negative are dropped (set to 0) and the rest refitted."""
    active = list(range(len(rows[0])))
    while active:
        solution = _lstsq([[row[j] for j in active] for row in rows], values)
        negative = [j for j, v in zip(active, solution) if v < 0]
        if not negative:
            result = [0.0] * len(rows[0])
            for j, v in zip(active, solution):
                result[j] = v
            return result
        active.remove(min(negative, key=lambda j: solution[active.index(j)]))
    return [0.0] * len(rows[0])


def fit(measurements: Sequence[Measurement], base: Protocol) -> tuple[Protocol, list[dict]]:
    """Refits `base`'s units from runs of that protocol by least squares: bytes on (1, kept ReLUs, [sites holding a
    ReLU,] secret products), rounds on (1, sites holding a ReLU, [kept ReLUs,] sites with products) (the bracketed
    units only where `base` has them), compute seconds on (1, kept ReLUs, sites) when the runs
    were timed; product units only when some run has products. The linear-layer units (secret weights) are constant
    for one architecture, so they are kept from `base` and subtracted first. Returns the fitted protocol and every
    run's prediction and error in percent."""
    runs = [m for m in measurements if m.protocol == base.name]
    if len(runs) < 3:
        raise FastmaskError(f"fit: {base.name} needs at least 3 runs with different masks, got {len(runs)}")
    with_products = any(sum(m.load.products) for m in runs)
    per_relu_rounds = base.rounds_per_relu != 0  # runtimes whose messages grow with a site's size (SPU)
    per_site_bytes = base.bytes_per_site != 0  # runtimes whose comparisons pay a fixed part per call (SPU)
    linear_only = dataclasses.replace(base, bytes_per_relu=0.0, rounds_per_site=0.0, bytes_fixed=0.0,
                                      rounds_fixed=0.0, bytes_per_product=0.0, rounds_per_product_site=0.0,
                                      rounds_per_relu=0.0, bytes_per_site=0.0, seconds_fixed=None)
    rest = [predict(m.load, linear_only) for m in runs]
    bytes_units = _lstsq([[1.0, m.load.relus] + ([m.load.sites] if per_site_bytes else []) +
                          ([sum(m.load.products)] if with_products else []) for m in runs],
                         [m.bytes - r.bytes for m, r in zip(runs, rest)])
    rounds_units = _lstsq([[1.0, m.load.sites] + ([m.load.relus] if per_relu_rounds else []) +
                           ([m.load.product_sites] if with_products else []) for m in runs],
                          [m.rounds - r.rounds for m, r in zip(runs, rest)])
    fitted = dataclasses.replace(base, bytes_fixed=bytes_units[0], bytes_per_relu=bytes_units[1],
                                 rounds_fixed=rounds_units[0], rounds_per_site=rounds_units[1])
    if per_relu_rounds:
        fitted = dataclasses.replace(fitted, rounds_per_relu=rounds_units[2])
    if per_site_bytes:
        fitted = dataclasses.replace(fitted, bytes_per_site=bytes_units[2])
    if with_products:
        fitted = dataclasses.replace(fitted, bytes_per_product=bytes_units[-1],
                                     rounds_per_product_site=rounds_units[-1])
    timed = [m for m in runs if m.seconds is not None]
    if len(timed) >= 3:
        s_fixed, s_relu, s_site = _non_negative_lstsq([[1.0, m.load.relus, m.load.sites] for m in timed],
                                                      [m.seconds for m in timed])
        fitted = dataclasses.replace(fitted, seconds_fixed=s_fixed, seconds_per_relu=s_relu,
                                     seconds_per_site=s_site)
    return fitted, residuals(runs, fitted)


def residuals(runs: Sequence[Measurement], protocol: Protocol) -> list[dict]:
    """Each run's measured and predicted bytes and rounds, and the prediction's error in percent."""
    rows = []
    for m in runs:
        cost = predict(m.load, protocol)
        rows.append({"relus": m.load.relus, "sites": m.load.sites, "products": sum(m.load.products),
                     "bytes": m.bytes, "rounds": m.rounds, "seconds": m.seconds,
                     "predicted_bytes": cost.bytes, "predicted_rounds": cost.rounds,
                     "predicted_seconds": cost.seconds_compute,
                     "bytes_error_percent": 100.0 * (cost.bytes - m.bytes) / m.bytes,
                     "rounds_error_percent": 100.0 * (cost.rounds - m.rounds) / m.rounds})
    return rows
