"""fastmask-pi --predict: a model's bytes, rounds and latency per protocol and network from fastmask.cost, without
running the two parties (seconds, where a full run takes minutes)."""
from __future__ import annotations

from typing import Mapping, Sequence

import torch.nn as nn

from .. import cost


def predictions(models: Sequence[tuple[str, nn.Module]], protocols: Sequence[str],
                networks: Mapping[str, cost.Network]) -> list[dict]:
    """One row per (protocol, model): ReLUs, sites holding one, MACs, bytes, rounds, setup and offline bytes, and
    the latency on each network."""
    rows = []
    loads = [(label, cost.workload(model)) for label, model in models]
    for name in protocols:
        protocol = cost.get_protocol(name)
        for label, load in loads:
            c = cost.predict(load, protocol)
            rows.append({"protocol": name, "dealer": protocol.dealer, "model": label, "relu_count": load.relus,
                         "sites": load.sites, "macs": load.macs, "bytes": round(c.bytes), "rounds": round(c.rounds, 2),
                         "setup_bytes": round(c.setup_bytes), "offline_bytes": round(c.offline_bytes),
                         "compute_seconds": c.seconds_compute,
                         "latency_seconds": {net: round(c.latency(n), 4) for net, n in networks.items()}})
    return rows


def table(rows: Sequence[dict], networks: Mapping[str, cost.Network]) -> str:
    names = list(networks)
    lines = ["| protocol | model | ReLUs | sites | bytes/image | rounds/image | " +
             " | ".join(f"{n} s/image" for n in names) + " |",
             "| --- | --- | ---: | ---: | ---: | ---: | " + " | ".join("---:" for _ in names) + " |"]
    for r in rows:
        lines.append(f"| {r['protocol']} | {r['model']} | {r['relu_count']:,} | {r['sites']} | {r['bytes']:,} | "
                     f"{r['rounds']:g} | " + " | ".join(f"{r['latency_seconds'][n]:.3f}" for n in names) + " |")
    lines.append("")
    for n, network in networks.items():
        lines.append(f"- {n}: {network}.")
    for name in dict.fromkeys(r["protocol"] for r in rows):
        lines.append(f"- {name}: {cost.get_protocol(name).source}.")
    lines.append("- latency = local compute + rounds x RTT + bytes / bandwidth (fastmask.cost); a prediction, not a "
                 "run: fastmask-pi without --predict measures.")
    return "\n".join(lines) + "\n"
