"""Compute as the equal-compute rule counts it: images trained on plus images pushed forward.

BCD's steps record both (a step's finetune and its estimate are trained on; its reference and candidates are pushed
forward), SNL's runs record their alpha phase and finetune as trained on. The pipeline sizes SNL's finetune next to
BCD with these sums, the report totals them, and bench/fidelity.py checks its arms with them: one definition.
"""
from __future__ import annotations

from typing import Iterable, Mapping

KEYS = ("train_images", "forward_images")


def images_spent(rows: Iterable[Mapping]) -> dict[str, int]:
    """{"train_images": ..., "forward_images": ...} summed over rows (BCD steps, targets or SNL runs)."""
    rows = list(rows)
    return {key: sum(int(row.get(key, 0)) for row in rows) for key in KEYS}


def image_passes(rows: Iterable[Mapping]) -> int:
    """What equal compute compares: images trained on + images pushed forward, summed over rows."""
    return sum(images_spent(rows).values())
