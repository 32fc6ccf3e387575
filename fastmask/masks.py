"""MaskSet: one flat view over every masked site of a model.

Sites are in forward order; the flat index runs over sites, then (c, h, w) in row-major order, so a flat index
names one ReLU of the network. Sampling, removal and candidate construction all work on flat indices.
The sites' transient search state (candidate masks, SNL alphas) is set only through the context managers here, so
it never outlives the `with` block that needs it, whatever that block raises.
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch
import torch.nn as nn

from .errors import FastmaskError
from .files import atomic_write, atomic_write_text
from .nn import MaskedReLU, masked_sites


class MaskSet:
    def __init__(self, model: nn.Module):
        self.model = model
        named = masked_sites(model)
        if not named:
            raise FastmaskError("the model has no MaskedReLU sites; build it with fastmask.models or fastmask.convert")
        self.names = [name for name, _ in named]
        self.sites: list[MaskedReLU] = [module for _, module in named]
        self.sizes = [m.mask.numel() for m in self.sites]
        self.offsets = [0]
        for size in self.sizes:
            self.offsets.append(self.offsets[-1] + size)

    # ---- counts -------------------------------------------------------------------------------------------
    def total(self) -> int:
        """Every maskable ReLU position, present or not."""
        return self.offsets[-1]

    def count(self) -> int:
        """Present (kept) ReLUs."""
        return sum(m.relu_count() for m in self.sites)

    def per_site(self) -> list[dict]:
        return [{"site": name, "shape": list(m.shape), "kept": m.relu_count(), "total": m.mask.numel()}
                for name, m in zip(self.names, self.sites)]

    # ---- flat index <-> (site, c, h, w) -----------------------------------------------------------------
    def locate(self, flat: int) -> tuple[int, tuple[int, ...]]:
        """Flat index -> (site index, position inside the site's mask)."""
        if not 0 <= flat < self.total():
            raise IndexError(f"flat index {flat} outside [0, {self.total()})")
        site = int(torch.searchsorted(torch.tensor(self.offsets), torch.tensor(flat), right=True)) - 1
        position = torch.unravel_index(torch.tensor(flat - self.offsets[site]), self.sites[site].shape)
        return site, tuple(int(p) for p in position)

    def flat_index(self, site: int, position: Sequence[int]) -> int:
        shape = self.sites[site].shape
        local = 0
        for p, s in zip(position, shape):
            if not 0 <= p < s:
                raise IndexError(f"position {tuple(position)} outside site {site} of shape {shape}")
            local = local * s + p
        return self.offsets[site] + local

    def site_of(self, flat: torch.Tensor) -> torch.Tensor:
        """Site index of each flat index (vectorised)."""
        bounds = torch.tensor(self.offsets[1:], device=flat.device)
        return torch.searchsorted(bounds, flat, right=True)

    # ---- whole-mask views ---------------------------------------------------------------------------------
    def flat(self) -> torch.Tensor:
        """All masks as one bool vector on the CPU (a copy)."""
        return torch.cat([m.mask.detach().reshape(-1).cpu() for m in self.sites])

    def set_flat(self, flat: torch.Tensor) -> None:
        if flat.numel() != self.total():
            raise FastmaskError(f"mask vector has {flat.numel()} entries; this model has {self.total()} ReLU sites")
        for m, start, end in zip(self.sites, self.offsets[:-1], self.offsets[1:]):
            m.mask.copy_(flat[start:end].reshape(m.shape).to(device=m.mask.device, dtype=torch.bool))

    def snapshot(self) -> list[torch.Tensor]:
        return [m.mask.detach().clone() for m in self.sites]

    def restore(self, snapshot: list[torch.Tensor]) -> None:
        for m, saved in zip(self.sites, snapshot):
            m.mask.copy_(saved)

    # ---- sampling and removal ------------------------------------------------------------------------------
    def present(self) -> torch.Tensor:
        """Flat indices of present ReLUs, ascending (CPU int64)."""
        return self.flat().nonzero().squeeze(1)

    def sample(self, k: int, generator: torch.Generator) -> torch.Tensor:
        """k distinct present ReLUs, uniformly at random (CPU int64, sorted). Deterministic given the generator."""
        present = self.present()
        if k > present.numel():
            raise FastmaskError(f"cannot sample {k} ReLUs: only {present.numel()} are present")
        chosen = present[torch.randperm(present.numel(), generator=generator)[:k]]
        return chosen.sort().values

    def remove(self, flat: torch.Tensor) -> None:
        """Masks out (linearizes) the ReLUs at these flat indices."""
        mask = self.flat()
        mask[flat.cpu()] = False
        self.set_flat(mask)

    def candidate_masks(self, candidates: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """For K candidates (flat indices to remove), per-site [K, *shape] bool masks: the current mask minus each."""
        k = len(candidates)
        flat = self.flat().unsqueeze(0).repeat(k, 1)
        for row, removed in enumerate(candidates):
            flat[row, removed.cpu()] = False
        return [flat[:, start:end].reshape(k, *m.shape).to(m.mask.device)
                for m, start, end in zip(self.sites, self.offsets[:-1], self.offsets[1:])]

    def first_site_touched(self, candidates: Sequence[torch.Tensor]) -> int:
        """The earliest site (forward order) any candidate changes; sites before it are shared by all."""
        lowest = min(int(c.min()) for c in candidates if c.numel())
        return int(self.site_of(torch.tensor([lowest]))[0])

    # ---- transient search state ----------------------------------------------------------------------------------
    @contextmanager
    def hypotheses(self, per_site: Sequence[Optional[torch.Tensor]]) -> Iterator[None]:
        """Inside the block, site s applies the K candidate masks per_site[s] ([K, *shape]; image n of a [K*N, ...]
        batch uses mask n // N); a None entry leaves that site on its own mask for every group. On exit every site
        has the hypotheses it had before (None outside any such block)."""
        if len(per_site) != len(self.sites):
            raise FastmaskError(f"hypotheses: {len(per_site)} entries for {len(self.sites)} sites")
        groups = {int(masks.shape[0]) for masks in per_site if masks is not None}
        if len(groups) > 1:
            raise FastmaskError(f"hypotheses: every site must hold the same number of candidates, got {sorted(groups)}")
        for name, site, masks in zip(self.names, self.sites, per_site):
            if masks is not None and tuple(masks.shape[1:]) != site.shape:
                raise FastmaskError(f"hypotheses for site {name} have shape {tuple(masks.shape)}, "
                                    f"expected [K, {', '.join(map(str, site.shape))}]")
        before = [site.hypotheses for site in self.sites]
        try:
            for site, masks in zip(self.sites, per_site):
                site.hypotheses = masks
            yield
        finally:
            for site, saved in zip(self.sites, before):
                site.hypotheses = saved

    @contextmanager
    def alphas(self) -> Iterator[list[nn.Parameter]]:
        """SNL's soft masks for the block: every site gets an alpha, 1 where its ReLU is present, 0 and
        gradient-frozen where absent (MaskedReLU.attach_alpha); yields them in site order, removes them on exit."""
        if self.carries_alphas():
            raise FastmaskError("the sites already carry alphas; leave the enclosing alphas() block first")
        try:
            yield [site.attach_alpha() for site in self.sites]
        finally:
            for site in self.sites:
                site.detach_alpha()

    def carries_alphas(self) -> bool:
        """Whether any site has an SNL alpha attached (its soft mask then overrides the binary one)."""
        return any(site.alpha is not None for site in self.sites)

    # ---- files -------------------------------------------------------------------------------------------
    def state(self) -> dict[str, torch.Tensor]:
        return {name: m.mask.detach().cpu().to(torch.uint8).contiguous() for name, m in zip(self.names, self.sites)}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        missing = [n for n in self.names if n not in state]
        if missing:
            raise FastmaskError(f"mask file lacks sites {missing[:3]}{'...' if len(missing) > 3 else ''}: "
                                "it was made for another architecture")
        for name, m in zip(self.names, self.sites):
            if tuple(state[name].shape) != m.shape:
                raise FastmaskError(f"mask for site {name} has shape {tuple(state[name].shape)}, "
                                    f"the model expects {m.shape}: it was made for another architecture or size")
            m.mask.copy_(state[name].to(device=m.mask.device, dtype=torch.bool))

    def summary(self) -> dict:
        return {"relu_count": self.count(), "total": self.total(), "sites": self.per_site()}

    def save(self, path: str | Path) -> None:
        """Masks as safetensors (uint8, one tensor per site) plus a JSON summary beside it (<path>.json)."""
        from safetensors.torch import save_file

        path = Path(path)
        with atomic_write(path) as tmp:
            save_file(self.state(), str(tmp))
        atomic_write_text(path.with_suffix(path.suffix + ".json"), json.dumps(self.summary(), indent=2))

    def load(self, path: str | Path) -> None:
        from safetensors.torch import load_file

        path = Path(path)
        if not path.is_file():
            raise FastmaskError(f"mask file {path} does not exist")
        try:
            state = load_file(str(path))
        except Exception as err:
            raise FastmaskError(f"mask file {path} is not a readable safetensors file ({err})") from err
        self.load_state(state)
