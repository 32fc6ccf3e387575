"""The run config: one tree of dataclasses, and the single place each setting's name, default, type, help and check
are written. fastmask-linearize's flags, the YAML reader, config.yaml and the validator are all derived from it.

Precedence: field defaults <- preset <- YAML file <- flags. The field defaults are the search that came out closest
to SNL in bench/FIDELITY.md (informed candidates, racing, two candidates a step, one Adam carried through the step
finetunes, a finetune at each target). A preset is a named set of overrides: `paper` is the paper's Algorithm 2
exactly, `demo` the small offline run on the embedded digits data (picked when no preset is given and the dataset
is digits). YAML takes the nested layout config.yaml is written in, or flat flag names (`snl_lr: 0.01`).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

from .cost import PROTOCOLS
from .errors import FastmaskError, UnknownSettings

CRITERIA = ("accuracy", "loss")
OPTIMIZERS = ("sgd", "adam")
METHODS = ("bcd", "snl", "both")
REPLACEMENTS = ("identity", "polynomial")
PROPOSALS = ("uniform", "informed")
SCORINGS = ("exact", "race")
STEP_SCHEDULES = ("fresh", "continuous")
COSTS = ("relus", "latency")


def setting(default: Any, help: str, kind: Callable = str, check: Optional[Callable] = None,
            choices: Sequence[str] = (), flag: Optional[str] = None, runtime: bool = False):
    """A config field. kind converts a YAML/flag value; check(value) returns an error text or None; runtime fields
    (device, out) may change between a run and its --resume; flag overrides the derived flag name."""
    metadata = {"help": help, "kind": kind, "check": check, "choices": tuple(choices), "flag": flag,
                "runtime": runtime}
    return field(default=default, metadata=metadata)


# ---- kinds and checks --------------------------------------------------------------------------------------------
def whole(value: Any) -> int:
    number = float(value)
    if math.isnan(number) or number != int(number):
        raise ValueError("not a whole number")
    return int(number)


def number(value: Any) -> float:
    result = float(value)
    if math.isnan(result):
        raise ValueError("NaN")
    return result


def budgets(value: Any) -> list[int]:
    """"20000,15000", "20k,15k" or [20000, 15000] -> [20000, 15000]."""
    items = value.split(",") if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else [value]
    result = []
    for item in items:
        text = str(item).strip().lower().replace("_", "")
        if text:
            scale = 1000 if text.endswith("k") else 1
            result.append(whole(float(text[:-1] if scale > 1 else text) * scale))
    return result


def floats(value: Any) -> list[float]:
    """"0.5,0.5,0.5" or [0.5, 0.5, 0.5] -> [0.5, 0.5, 0.5]."""
    items = value.split(",") if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else [value]
    return [number(item) for item in items if str(item).strip()]


def seconds_list(value: Any) -> list[float]:
    """"2.5,1.8", "2.5s,1.8s" or [2.5, 1.8] -> [2.5, 1.8]."""
    items = value.split(",") if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else [value]
    return floats([str(item).strip().lower().removesuffix("s") for item in items])


def one_or_three(values) -> Optional[str]:
    return None if len(values) in (1, 3) else "must give 1 or 3 values"


def one_or_three_positive(values) -> Optional[str]:
    if len(values) not in (1, 3):
        return "must give 1 or 3 values"
    return None if all(v > 0 for v in values) else "must be > 0"


def known_network(value: str) -> Optional[str]:
    from .cost import parse_network

    try:
        parse_network(value)
    except FastmaskError as err:
        return str(err).replace("--network takes ", "must be ")
    return None


def positive(value) -> Optional[str]:
    return None if value > 0 else "must be > 0"


def non_negative(value) -> Optional[str]:
    return None if value >= 0 else "must be >= 0"


def descending_non_negative(values) -> Optional[str]:
    if any(t < 0 for t in values):
        return "must be >= 0"
    if any(b >= a for a, b in zip(values, values[1:])):
        return "must be strictly descending"
    return None


# ---- the tree ----------------------------------------------------------------------------------------------------
@dataclass
class DataConfig:
    dataset: str = setting("digits", "digits (the offline default), cifar10, cifar100, tinyimagenet, npz:<path>, or "
                                     "folder:<path> (an ImageFolder layout: train/ with val/ and/or test/ beside "
                                     "it, or one folder of class folders)")
    data_dir: Optional[str] = setting(None, "folder holding the dataset (cifar, tinyimagenet); cifar is downloaded "
                                            "there when missing and the machine is online")
    val_size: float = setting(0.1, "validation images carved from train: a count, or a fraction below 1",
                              kind=number, check=lambda v: None if 0 < v < 1 or (v >= 1 and v == int(v)) else
                              "must be a fraction below 1 or a whole count")
    image_size: Optional[int] = setting(None, "folder datasets: images are resized (shorter side) and center-cropped "
                                              "to this size (default 32)", kind=whole,
                                        check=lambda v: None if v >= 4 else "must be >= 4")
    mean: Optional[list[float]] = setting(None, "folder datasets: per-channel mean in [0, 1] units, e.g. "
                                                "0.485,0.456,0.406 (default: computed from the train split)",
                                          kind=floats, check=one_or_three)
    std: Optional[list[float]] = setting(None, "folder datasets: per-channel std in [0, 1] units (default: computed "
                                               "from the train split)", kind=floats, check=one_or_three_positive)


@dataclass
class ModelConfig:
    arch: Optional[str] = setting(None, "resnet18, wide_resnet22_8, torchvision:<name> (e.g. torchvision:resnet50), "
                                        "or your builder as path/to/file.py:function or package.module:function "
                                        "(default: the checkpoint's, else resnet18)")
    width: Optional[int] = setting(None, "channel width of the first stage (resnet18: 64, wrn: 128)", kind=whole,
                                   check=positive)
    checkpoint: Optional[str] = setting(None, "trained model: a fastmask .safetensors, or your state_dict for --arch "
                                              "(.safetensors, or .pt/.pth read with torch.load(weights_only=True)); "
                                              "without it a baseline is trained")
    teacher: Optional[str] = setting(None, "model to distill from during SNL and finetunes, in the forms --checkpoint "
                                           "takes (default: the full-ReLU baseline when the run has one)")


@dataclass
class BaselineConfig:
    epochs: int = setting(200, "epochs of baseline training when there is no checkpoint", kind=whole, check=positive)


@dataclass
class SNLConfig:
    """SNL (Cho et al. 2022): the defaults are SNL's own."""

    ref_budget: Optional[int] = setting(None, "B_ref: SNL cuts the model to this many ReLUs before BCD", kind=whole,
                                        check=positive, flag="ref-budget")
    epochs: int = setting(2000, "most epochs SNL's alpha phase may spend reaching B_ref", kind=whole, check=positive)
    lr: float = setting(1e-3, "SNL's Adam lr on weights and alphas", kind=number, check=positive)
    lambda0: float = setting(1e-5, "SNL's initial L1 weight on the alphas (raise it for small models and short "
                                   "runs: Adam moves an alpha by about lr per step)", kind=number, check=non_negative)
    lambda_growth: float = setting(1.1, "factor on lambda after an epoch in which the count reached no new low",
                                   kind=number, check=lambda v: None if v >= 1 else "must be >= 1")
    threshold: float = setting(1e-2, "an alpha above this counts as a ReLU", kind=number, check=non_negative)
    stall_patience: int = setting(5, "epochs before lambda may grow (0-based, as SNL's code)", kind=whole,
                                  check=non_negative)
    finetune_epochs: int = setting(100, "finetune epochs after SNL binarizes", kind=whole, check=non_negative)
    target_epochs: Optional[int] = setting(None, "most alpha-phase epochs from B_ref to each target (--method snl or "
                                                 "both; default: --snl-epochs)", kind=whole, check=positive)


@dataclass
class BCDConfig:
    """The search: drc/rt/adt as in the paper's Algorithm 2 (rt's default is not the paper's); adt is in accuracy
    points (or loss units for loss)."""

    targets: Optional[list[int]] = setting(None, "ReLU budgets, strictly descending, e.g. 20000,15000 or 20k,15k",
                                           kind=budgets, check=descending_non_negative)
    drc: int = setting(100, "ReLUs removed per BCD step", kind=whole, check=positive)
    # 2, not the paper's 50: at equal compute the forwards a wide search spends buy more as training between
    # removals (bench/FIDELITY.md); --preset paper restores 50.
    rt: int = setting(2, "candidates tried per step (the paper's: 50; 1: the one candidate is taken unscored, "
                         "there being nothing to choose between)", kind=whole, check=positive)
    adt: float = setting(0.3, "accuracy degradation tolerance, accuracy points (loss units for --criterion loss)",
                         kind=number, check=non_negative)
    criterion: str = setting("accuracy", "drop measured in accuracy or in loss", choices=CRITERIA)
    score_subset: int = setting(0, "train images candidates are scored on (0 = the whole train split)", kind=whole,
                                check=non_negative)
    score_batch_size: int = setting(512, "images per scoring batch", kind=whole, check=positive)
    proposal: str = setting("informed", "how candidates are drawn: uniform (the paper's), or informed: from the "
                                        "ReLUs whose first-order removal cost |dL/dy * (r(x) - relu(x))| is smallest",
                            choices=PROPOSALS)
    pool: float = setting(4.0, "informed: candidates are drawn from the pool*DRC cheapest ReLUs", kind=number,
                          check=lambda v: None if v >= 1 else "must be >= 1")
    # 0.5 makes the cheapest pool member e^2 (about 7x) likelier to be drawn first than the dearest one: candidates
    # lean cheap but still explore the whole pool.
    temperature: float = setting(0.5, "informed: sampling temperature inside the pool, in units of its cost "
                                      "spread (inf: uniform in the pool)", kind=number, check=positive)
    scoring: str = setting("race", "exact: the paper's rule (first candidate under ADT, all images); race: "
                                   "successive halving on growing slices, survivors scored on every image",
                           choices=SCORINGS)
    race_eta: int = setting(2, "race: keep 1/eta of the candidates per round, eta times the images",
                            kind=whole, check=lambda v: None if v >= 2 else "must be >= 2")
    cost: str = setting("relus", "what a removal is weighed by: relus (every ReLU alike), or latency: the predicted "
                                 "private-inference latency on --network under --protocol (fastmask.cost), where "
                                 "emptying a site saves its rounds", choices=COSTS)
    network: str = setting("wan", "the network latencies are predicted on: lan, wan, or BANDWIDTH_MBIT,RTT_MS",
                           check=known_network)
    protocol: str = setting("crypten-public", "the two-party protocol latencies are predicted for (fastmask/cost.py)",
                            choices=tuple(PROTOCOLS))
    latency_targets: Optional[list[float]] = setting(
        None, "targets as predicted latencies in seconds (on --network under --protocol), strictly descending, "
              "instead of --targets: each is saved when the prediction first falls to it (--method bcd)",
        kind=seconds_list, check=lambda v: descending_non_negative(v) or (None if all(t > 0 for t in v) else
                                                                          "must be > 0"))

    def validate(self, start_count: int) -> None:
        """The checks that need the model: targets given and below the count BCD starts from (latency targets are
        checked by the driver, which prices the model)."""
        check(self)
        if self.targets and self.latency_targets:
            raise FastmaskError("give BCD's targets as ReLU budgets (--targets) or as latencies (--latency-targets), "
                                "not both")
        if self.latency_targets:
            return
        if not self.targets:
            raise FastmaskError("BCD needs at least one target ReLU budget: --targets is required (e.g. --targets "
                                "20000,15000)")
        if self.targets[0] >= start_count:
            raise FastmaskError(f"target {self.targets[0]} is at or above the ReLU count BCD starts from "
                                f"({start_count}); give targets below it")


@dataclass
class FinetuneConfig:
    epochs: Optional[int] = setting(None, "finetune epochs per BCD step (default: the paper's 20, or 5 on "
                                          "tinyimagenet)", kind=whole, check=positive)
    # Adam at 1e-3 is SNL's alpha-phase optimizer, which trains the weights through its removals; given to every
    # finetune of both methods it lifted BCD more than SGD at 1e-3 or 1e-2 did (bench/FIDELITY.md, lean-adam).
    optimizer: Optional[str] = setting("adam", "every finetune's optimizer (BCD steps, after SNL, SNL to a target); "
                                               "null (YAML, or --preset paper): the paper's, sgd for resnet and adam "
                                               "for wide resnets",
                                       choices=OPTIMIZERS)
    lr: Optional[float] = setting(1e-3, "every finetune's lr (SNL's alpha-phase lr); null (YAML, or --preset "
                                        "paper): the paper's, 1e-3 for sgd and 3.5e-5 for adam", kind=number,
                                  check=positive)
    max_steps: Optional[int] = setting(None, "at most this many optimizer steps in each BCD step's finetune (a "
                                             "fraction of an epoch)", kind=whole, check=positive)
    step_schedule: str = setting("continuous", "BCD's step finetunes: continuous (one optimizer carried from step to "
                                               "step at a constant lr, training through the removals as SNL's alpha "
                                               "phase does; the target finetune stays fresh) or fresh (a new "
                                               "optimizer and a cosine from lr to 0 each step, the paper's)",
                                 choices=STEP_SCHEDULES)
    target_epochs: int = setting(10, "finetune epochs when BCD lands on a target, before the target is measured and "
                                     "saved (counted in its compute; the search goes on from the finetuned model; "
                                     "the paper's: 0)", kind=whole, check=non_negative)

    def epochs_for(self, dataset: str) -> int:
        if self.epochs is not None:
            return self.epochs
        return 5 if "tiny" in dataset.lower() else 20


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    baseline: BaselineConfig = field(default_factory=BaselineConfig)
    snl: SNLConfig = field(default_factory=SNLConfig)
    bcd: BCDConfig = field(default_factory=BCDConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    method: str = setting("bcd", "bcd: BCD from the SNL model at B_ref; snl: SNL from B_ref straight to each "
                                 "target; both: the two from the same B_ref model with equal compute, counted in "
                                 "image passes (images trained on + images pushed forward)",
                          choices=METHODS)
    replacement: str = setting("identity", "what a removed ReLU becomes: identity, or a per-channel polynomial "
                                           "c0 + c1 x + c2 x^2 fitted by least squares and trained with the weights "
                                           "where the ReLU's input is a BatchNorm's output (the identity after a "
                                           "residual add)",
                               choices=REPLACEMENTS)
    seed: int = setting(0, "seed of the split, training and candidate sampling", kind=whole, check=non_negative)
    device: Optional[str] = setting(None, "cpu, cuda, cuda:1 ... (default: cuda when available)", runtime=True)
    out: str = setting("fastmask_runs/run", "output folder", runtime=True)


# Flag prefix per section: --drc, --snl-lr, --finetune-epochs, --baseline-epochs ...
FLAG_PREFIX = {"data": "", "model": "", "baseline": "baseline-", "snl": "snl-", "bcd": "", "finetune": "finetune-"}

PRESETS: dict[str, dict[str, Any]] = {
    # Algorithm 2 as the paper runs it on CIFAR (TinyImageNet: 5 finetune epochs per step, see FinetuneConfig). Its
    # values are pinned here on purpose, even where today's defaults agree: the preset must not move with them.
    "paper": {"model.arch": "resnet18", "baseline.epochs": 200, "snl.epochs": 2000, "snl.lr": 1e-3,
              "snl.lambda0": 1e-5, "snl.finetune_epochs": 100, "bcd.drc": 100,
              "bcd.rt": 50, "bcd.adt": 0.3, "bcd.criterion": "accuracy", "bcd.score_subset": 0,
              "bcd.proposal": "uniform", "bcd.scoring": "exact",
              "replacement": "identity", "method": "bcd",
              "finetune.target_epochs": 0, "finetune.step_schedule": "fresh", "finetune.optimizer": None,
              "finetune.lr": None, "finetune.epochs": None},
    # The offline demo: 1,797 digits at 16x16, resnet18 at width 8 (15,360 ReLUs), a few minutes on 2 CPU cores.
    # ADT is 2 points because the ~1,300-image train split's standard error at ~90% accuracy is ~0.8 points: below
    # 2 standard errors candidates would be picked on noise. SNL's lr and lambda0 are 10x and 100x SNL's: an epoch
    # here is only 11 steps, and Adam moves an alpha by about lr per step.
    "demo": {"data.dataset": "digits", "model.arch": "resnet18", "model.width": 8, "snl.ref_budget": 3000,
             "bcd.targets": [2000, 1200], "bcd.drc": 200, "bcd.adt": 2.0, "finetune.epochs": 1,
             "baseline.epochs": 15, "snl.epochs": 15, "snl.lr": 1e-2, "snl.lambda0": 1e-3,
             "snl.finetune_epochs": 3, "out": "fastmask_runs/digits"},
}


# ---- walking the tree --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Setting:
    path: str  # "bcd.drc"
    flag: str  # "drc"
    field: dataclasses.Field
    owner: type  # the dataclass holding the field

    @property
    def dest(self) -> str:
        return self.flag.replace("-", "_")

    @property
    def help(self) -> str:
        return self.field.metadata["help"]

    def convert(self, value: Any) -> Any:
        """The value in the setting's type, or FastmaskError naming the flag."""
        if value is None:
            return None
        meta = self.field.metadata
        try:
            value = meta["kind"](value)
        except (TypeError, ValueError, OverflowError):
            raise FastmaskError(f"{self.flag} must be {_kind_name(meta['kind'])}, got {value!r}") from None
        if meta["choices"] and value not in meta["choices"]:
            raise FastmaskError(f"{self.flag} must be one of {', '.join(meta['choices'])}, got {value!r}")
        problem = meta["check"](value) if meta["check"] is not None else None
        if problem:
            raise FastmaskError(f"{self.flag} {problem}, got {value!r}")
        return value


def _kind_name(kind: Callable) -> str:
    return {whole: "a whole number", number: "a number", budgets: "ReLU counts like 20000,15000",
            floats: "numbers like 0.5,0.5,0.5"}.get(kind, "text")


def settings(cls: type = RunConfig, prefix: str = "", flag_prefix: str = "") -> Iterator[Setting]:
    """Every leaf setting of the tree in order."""
    for f in dataclasses.fields(cls):
        if "help" not in f.metadata:  # a section
            yield from settings(f.default_factory, f"{prefix}{f.name}.", FLAG_PREFIX[f.name])
        else:
            flag = f.metadata["flag"] or flag_prefix + f.name.replace("_", "-")
            yield Setting(prefix + f.name, flag, f, cls)


SETTINGS = {s.path: s for s in settings()}
BY_DEST = {s.dest: s for s in SETTINGS.values()}


def get(config: RunConfig, path: str) -> Any:
    section, _, name = path.rpartition(".")
    return getattr(getattr(config, section) if section else config, name)


def put(config: RunConfig, path: str, value: Any) -> None:
    section, _, name = path.rpartition(".")
    setattr(getattr(config, section) if section else config, name, SETTINGS[path].convert(value))


def check(config: Any) -> None:
    """Every field check of a RunConfig, or of one of its sections: FastmaskError naming the flag."""
    for s in SETTINGS.values():
        if isinstance(config, RunConfig):
            s.convert(get(config, s.path))
        elif s.owner is type(config):
            s.convert(getattr(config, s.field.name))


# ---- reading: defaults <- preset <- YAML <- flags ----------------------------------------------------------------
def flatten_yaml(values: Mapping[str, Any], source: str) -> dict[str, Any]:
    """A nested (config.yaml) or flat (flag names) mapping -> {path: value}; unknown keys are an error."""
    flat: dict[str, Any] = {}
    unknown = []
    for key, value in values.items():
        key = str(key).replace("-", "_")
        if isinstance(value, Mapping) and key in FLAG_PREFIX:
            for inner, inner_value in value.items():
                path = f"{key}.{str(inner).replace('-', '_')}"
                (flat.__setitem__(path, inner_value) if path in SETTINGS else unknown.append(path))
        elif key in BY_DEST:
            flat[BY_DEST[key].path] = value
        else:
            unknown.append(key)
    if unknown:
        raise UnknownSettings(f"{source} has unknown settings {', '.join(sorted(unknown))}; known: "
                              f"{', '.join(sorted(BY_DEST))}", sorted(unknown))
    return flat


def read_yaml(path: str | Path) -> dict[str, Any]:
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
    return flatten_yaml(values, f"config file {path}")


def resolve(flags: Mapping[str, Any], yaml_values: Mapping[str, Any] = {}, preset: Optional[str] = None
            ) -> RunConfig:
    """defaults <- preset <- YAML <- flags, each a {path: value} map, checked value by value. A YAML null is a value
    (it clears a preset's setting, so a run's config.yaml reproduces it); a flag of None was not typed."""
    given = dict(yaml_values)
    given.update({k: v for k, v in flags.items() if v is not None})
    dataset = str(given.get("data.dataset") or DataConfig.dataset)
    if preset is None and dataset == "digits":
        preset = "demo"
    if preset is not None and preset not in PRESETS:
        raise FastmaskError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    config = RunConfig()
    chosen = dict(PRESETS.get(preset, {}))
    if given.get("model.checkpoint") is not None:
        # A given model fixes the architecture; a preset's arch/width only describe the model it would train.
        chosen.pop("model.arch", None)
        chosen.pop("model.width", None)
    if given.get("bcd.latency_targets") is not None:  # targets given as latencies replace the preset's budgets
        chosen.pop("bcd.targets", None)
    chosen.update(given)
    for path, value in chosen.items():
        put(config, path, value)
    return config


def validate(config: RunConfig) -> RunConfig:
    """Checks across settings that need no model (the model-dependent ones: BCDConfig.validate)."""
    check(config)
    targets, ref = config.bcd.targets, config.snl.ref_budget
    if config.bcd.latency_targets and config.method != "bcd":
        raise FastmaskError(f"--latency-targets are BCD's (--method bcd); SNL takes ReLU budgets: give --method "
                            f"{config.method} its --targets")
    if targets and ref is not None and targets[0] >= ref:
        raise FastmaskError(f"target {targets[0]} is at or above the reference budget {ref}; give targets below "
                            "--ref-budget")
    return config


# ---- writing and comparing ---------------------------------------------------------------------------------------
def to_dict(config: RunConfig) -> dict:
    return dataclasses.asdict(config)


def dump(config: RunConfig) -> str:
    """config.yaml: the nested tree, each setting with its help as a comment."""
    import yaml

    def scalar(value: Any) -> str:
        return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()

    lines, section = [], None
    for s in SETTINGS.values():
        head, _, name = s.path.rpartition(".")
        if head != section:
            section = head
            if head:
                lines.append(f"{head}:")
        indent = "  " if head else ""
        lines.append(f"{indent}{name}: {scalar(get(config, s.path))}  # {s.help}")
    return "\n".join(lines) + "\n"


def describe(section: Any) -> str:
    """One section's settings as the flags that set them, e.g. "--drc 200 --rt 2 ..." (for a run's log)."""
    return " ".join(f"--{s.flag} {_flag_text(getattr(section, s.field.name))}" for s in SETTINGS.values()
                    if s.owner is type(section))


def _flag_text(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return "null" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def comparable(config: RunConfig) -> dict:
    """What identifies a run: every setting but the runtime ones (device, out)."""
    return {p: get(config, p) for p, s in SETTINGS.items() if not s.field.metadata["runtime"]}


def load_saved(path: str | Path) -> Optional[RunConfig]:
    """The config of an existing run folder (its config.yaml), or None when there is none. A config.yaml that does
    not read as a run config raises FastmaskError."""
    path = Path(path)
    if not path.is_file():
        return None
    config = RunConfig()
    for p, value in read_yaml(path).items():
        put(config, p, value)
    return config
