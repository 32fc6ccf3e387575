"""fastmask-linearize's settings: defaults (the paper's, or the small offline demo's), a YAML file, then flags.

Flags default to None so that a flag the user did not type never overrides a YAML value; resolve() merges
defaults <- YAML <- flags and checks every value before anything is written.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Optional

from .errors import FastmaskError

# Everything a run is made of. Order is the order of config.yaml.
KEYS = ("dataset", "data_dir", "arch", "width", "checkpoint", "teacher", "ref_budget", "targets", "drc", "rt", "adt",
        "criterion", "finetune_epochs", "finetune_optimizer", "finetune_lr", "baseline_epochs", "snl_epochs",
        "snl_lr", "snl_lambda0", "snl_finetune_epochs", "score_subset", "val_size", "seed", "device", "out")
# Keys that may change between a run and its --resume without making it another run.
RUNTIME_KEYS = ("device", "out")

# The paper's BCD settings (CIFAR; TinyImageNet finetunes 5 epochs per step) and a standard baseline recipe.
PAPER = {"arch": "resnet18", "drc": 100, "rt": 50, "adt": 0.3, "criterion": "accuracy", "finetune_epochs": 20,
         "baseline_epochs": 200, "snl_epochs": 2000, "snl_lr": 1e-3, "snl_lambda0": 1e-5, "snl_finetune_epochs": 100,
         "score_subset": 0, "val_size": 0.1, "seed": 0, "out": "fastmask_runs/run"}
PAPER_FINETUNE_EPOCHS = {"tinyimagenet": 5}

# The offline demo (no arguments): 1,797 digits at 16x16, resnet18 at width 8 (15,360 ReLUs). Sized to finish in a
# few minutes on 2 CPU cores. ADT is 2 points because the ~1,300-image train split's standard error at ~90% accuracy
# is ~0.8 points: below 2 standard errors candidates would be picked on noise (the driver warns then). SNL's lr and lambda0 are 10x and 100x the paper's:
# an epoch here is only 11 steps, and Adam moves an alpha by about lr per step (calibration note).
DIGITS = {"dataset": "digits", "arch": "resnet18", "width": 8, "ref_budget": 3000, "targets": [2000, 1200],
          "drc": 200, "rt": 8, "adt": 2.0, "criterion": "accuracy", "finetune_epochs": 1, "baseline_epochs": 15,
          "snl_epochs": 15, "snl_lr": 1e-2, "snl_lambda0": 1e-3, "snl_finetune_epochs": 3, "score_subset": 0,
          "val_size": 0.1, "seed": 0, "out": "fastmask_runs/digits"}


def parse_targets(value: Any) -> Optional[list[int]]:
    """"20000,15000" or [20000, 15000] (or "20k,15k") -> [20000, 15000]."""
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else [value]
    targets = []
    for item in items:
        text = str(item).strip().lower().replace("_", "")
        if not text:
            continue
        scale = 1000 if text.endswith("k") else 1
        try:
            number = float(text[:-1] if scale > 1 else text) * scale
        except ValueError:
            raise FastmaskError(f"targets must be ReLU counts like 20000,15000; got {value!r}") from None
        if number != int(number):
            raise FastmaskError(f"targets must be whole ReLU counts, got {item!r}")
        targets.append(int(number))
    return targets


def read_yaml(path: str | Path) -> dict:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FastmaskError(f"config file {path} does not exist")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise FastmaskError(f"config file {path} is not valid YAML ({str(err).splitlines()[0]})") from err
    if not isinstance(values, dict):
        raise FastmaskError(f"config file {path} must hold a mapping of settings, e.g. 'targets: [2000, 1000]'")
    values = {str(k).replace("-", "_"): v for k, v in values.items()}
    unknown = sorted(set(values) - set(KEYS))
    if unknown:
        raise FastmaskError(f"config file {path} has unknown settings {', '.join(unknown)}; known: {', '.join(KEYS)}")
    return values


def defaults_for(dataset: str) -> dict:
    if dataset == "digits":
        return dict(DIGITS)
    defaults = dict(PAPER)
    key = dataset.lower().replace("-", "").replace("_", "")
    defaults["finetune_epochs"] = PAPER_FINETUNE_EPOCHS.get(key.replace("200", ""), PAPER["finetune_epochs"])
    return defaults


def resolve(flags: Mapping[str, Any], yaml_values: Mapping[str, Any]) -> dict:
    """defaults <- YAML <- flags (None = not given). The dataset picks the defaults, so it is resolved first."""
    given = {k: v for k, v in yaml_values.items() if v is not None}
    given.update({k: v for k, v in flags.items() if k in KEYS and v is not None})
    dataset = str(given.get("dataset", "digits"))
    config = {key: None for key in KEYS}
    config.update(defaults_for(dataset))
    if given.get("checkpoint") is not None and dataset == "digits":
        # A given model fixes the architecture; the demo's arch/width only describe the model it would train.
        config["arch"] = config["width"] = None
    config.update(given)
    config["dataset"] = dataset
    config["targets"] = parse_targets(config["targets"])
    return config


def _number(config: dict, key: str, kind, minimum=None, strictly=True) -> None:
    value = config[key]
    if value is None:
        return
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise FastmaskError(f"{key.replace('_', '-')} must be a number, got {value!r}") from None
    if kind is int and float(value) != number:
        raise FastmaskError(f"{key.replace('_', '-')} must be a whole number, got {value!r}")
    if isinstance(number, float) and math.isnan(number):
        raise FastmaskError(f"{key.replace('_', '-')} must be a number, got NaN")
    if minimum is not None and (number <= minimum if strictly else number < minimum):
        relation = ">" if strictly else ">="
        raise FastmaskError(f"{key.replace('_', '-')} must be {relation} {minimum}, got {value!r}")
    config[key] = number


def check(config: dict) -> dict:
    """Types and ranges of every value (in place); the checks that need the model come later (cli)."""
    for key in ("drc", "rt", "finetune_epochs", "baseline_epochs", "snl_epochs"):
        _number(config, key, int, 0)
    _number(config, "snl_finetune_epochs", int, 0, strictly=False)
    for key in ("width", "ref_budget"):
        _number(config, key, int, 0)
    _number(config, "score_subset", int, 0, strictly=False)
    _number(config, "seed", int, 0, strictly=False)
    _number(config, "adt", float, 0, strictly=False)
    _number(config, "finetune_lr", float, 0)
    _number(config, "snl_lambda0", float, 0, strictly=False)
    _number(config, "snl_lr", float, 0)
    _number(config, "val_size", float, 0)
    if config["criterion"] not in ("accuracy", "loss"):
        raise FastmaskError(f"criterion must be accuracy or loss, got {config['criterion']!r}")
    if config["finetune_optimizer"] is not None and str(config["finetune_optimizer"]).lower() not in ("sgd", "adam"):
        raise FastmaskError(f"finetune-optimizer must be sgd or adam, got {config['finetune_optimizer']!r}")
    return config


def check_targets(config: dict) -> dict:
    """Targets given, non-negative, strictly descending and below the reference budget."""
    targets = config["targets"]
    if not targets:
        raise FastmaskError(f"--targets is required for dataset {config['dataset']!r} (e.g. --targets 20000,15000)")
    if any(t < 0 for t in targets):
        raise FastmaskError(f"targets must be >= 0, got {','.join(map(str, targets))}")
    if any(b >= a for a, b in zip(targets, targets[1:])):
        raise FastmaskError(f"targets must be strictly descending, got {','.join(map(str, targets))}")
    if config["ref_budget"] is not None and targets[0] >= config["ref_budget"]:
        raise FastmaskError(f"target {targets[0]} is at or above the reference budget {config['ref_budget']}; "
                            "give targets below --ref-budget")
    return config


def comparable(config: Mapping[str, Any]) -> dict:
    """The part of a config that identifies a run (what must match for an out dir to be the same run)."""
    return {k: config.get(k) for k in KEYS if k not in RUNTIME_KEYS}


def dump(config: Mapping[str, Any]) -> str:
    import yaml

    return yaml.safe_dump({k: config.get(k) for k in KEYS}, sort_keys=False)


def load_saved(path: str | Path) -> Optional[dict]:
    """The config.yaml of an existing run, or None when there is none."""
    import yaml

    path = Path(path)
    if not path.is_file():
        return None
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        values = None
    return values if isinstance(values, dict) else {"unreadable": True}
