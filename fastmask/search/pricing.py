"""BCD with latency as the cost (--cost latency): what a removal saves in the predicted private-inference latency,
and candidates and choices that spend accuracy where it buys the most latency.

On a network with a real round-trip time, a site that holds even one ReLU costs its rounds (CrypTen: 9 rounds, 0.36 s
at 40 ms), while a ReLU costs its bytes (CrypTen: 464 bytes, 37 us at 100 Mbit/s): the last ReLUs of a small site are
worth thousands of ReLUs elsewhere. Counting ReLUs alone, BCD never aims at emptying a site. Here:
- a present ReLU's first-order removal cost is divided by the latency it frees: its bytes plus its share of its
  site's rounds (the site's round cost over the ReLUs the site still holds), so candidates lean to small sites;
- one extra candidate empties a whole site: the site, among those small enough to empty in one step, with the least
  estimated accuracy cost per second its emptying saves; it is scored first;
- the choice: among scored candidates within ADT, the one that saves the most latency; when none is within ADT, the
  one with the smallest drop per second saved.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn as nn

from .. import cost
from ..masks import MaskSet


@dataclass
class LatencyPricing:
    """The cost model of a run: the model's workload (its linear layers and polynomial products stay as they are),
    the protocol and the network."""

    load: cost.Workload
    protocol: cost.Protocol
    network: cost.Network

    @classmethod
    def of(cls, model: nn.Module, protocol: str, network: str) -> "LatencyPricing":
        return cls(cost.workload(model), cost.get_protocol(protocol), cost.parse_network(network))

    def latency(self, kept: Sequence[int], products: Optional[Sequence[int]] = None) -> float:
        """Predicted seconds of one inference with `kept` ReLUs (and `products` secret products) per site."""
        return cost.latency(self.load.with_kept(kept, products), self.protocol, self.network)

    def current(self, mask_set: MaskSet) -> float:
        """The predicted latency of the masks as they are (a polynomial site's products follow its removed ReLUs)."""
        return self.latency(kept_per_site(mask_set), products_per_site(mask_set))

    def floor(self, mask_set: MaskSet) -> float:
        """The latency with every ReLU removed (each position replaced): what no search can go below."""
        products = [int(cost.quadratic_positions(site).sum()) for site in mask_set.sites]
        return self.latency([0] * len(self.load.kept), products)

    def describe(self) -> str:
        return f"{self.protocol.name} on {self.network}"

    def per_relu_and_site(self) -> tuple[float, float]:
        return cost.site_saving(self.protocol, self.network)

    def weighted(self, costs: torch.Tensor, mask_set: MaskSet) -> torch.Tensor:
        """Each present ReLU's |cost| per second its removal frees, its site's rounds shared out over the ReLUs the
        site holds (+inf where absent, as `costs`)."""
        per_relu, per_site = self.per_relu_and_site()
        kept = torch.tensor(kept_per_site(mask_set), dtype=torch.float64)
        site = torch.repeat_interleave(torch.arange(len(mask_set.sites)), torch.tensor(mask_set.sizes))
        frees = per_relu + per_site / kept.clamp(min=1)[site]
        return costs.double().abs() / frees

    def emptying(self, costs: Optional[torch.Tensor], mask_set: MaskSet, remove: int) -> Optional[torch.Tensor]:
        """The flat indices that empty one site (the best by estimated cost per second saved, or the smallest site
        without estimates), among the sites holding at most `remove` ReLUs; None when no site is that small."""
        per_relu, per_site = self.per_relu_and_site()
        present = mask_set.flat()
        best, best_value = None, math.inf
        for start, end in zip(mask_set.offsets[:-1], mask_set.offsets[1:]):
            indices = start + present[start:end].nonzero().squeeze(1)
            held = int(indices.numel())
            if held == 0 or held > remove:
                continue
            estimated = float(costs[indices].abs().sum()) if costs is not None else float(held)
            value = estimated / (per_site + per_relu * held)
            if value < best_value:
                best, best_value = indices.sort().values, value
        return best

    def saving(self, candidate: torch.Tensor, mask_set: MaskSet) -> float:
        """Seconds of predicted latency that removing `candidate` (flat indices) saves: its ReLUs, and the rounds of
        a site it empties, less the secret products its removed positions take on (polynomial sites)."""
        kept, products = kept_per_site(mask_set), products_per_site(mask_set)
        sites = mask_set.site_of(candidate)
        quadratic = torch.cat([cost.quadratic_positions(site).reshape(-1).cpu() for site in mask_set.sites])
        removed = torch.bincount(sites, minlength=len(kept)).tolist()
        added = torch.bincount(sites[quadratic[candidate]], minlength=len(kept)).tolist()
        after = [k - r for k, r in zip(kept, removed)]
        more = [p + a for p, a in zip(products, added)]
        return self.latency(kept, products) - self.latency(after, more)


def kept_per_site(mask_set: MaskSet) -> list[int]:
    return [int(site.mask.sum()) for site in mask_set.sites]


def products_per_site(mask_set: MaskSet) -> list[int]:
    """Secret products per site: its removed positions whose replacement is quadratic."""
    return [int((~site.mask.detach() & cost.quadratic_positions(site)).sum()) for site in mask_set.sites]


def choose_by_saving(drops: Sequence[float], savings: Sequence[float], adt: float) -> tuple[int, bool]:
    """(index, fallback?): among candidates with a drop below adt, the one saving the most latency (ties: the
    earlier); when none is below adt, the smallest drop per second saved (fallback). NaN drops (unscored) are
    skipped."""
    scored = [i for i, d in enumerate(drops) if not math.isnan(d)]
    within = [i for i in scored if drops[i] < adt]
    if within:
        return max(within, key=lambda i: (savings[i], -i)), False
    return min(scored, key=lambda i: (drops[i] / max(savings[i], 1e-12), i)), True
