"""fastmask-linearize: baseline -> SNL to B_ref -> BCD through the targets -> report, in one command.

Each stage runs only when its inputs do not already give its output: a --checkpoint skips the baseline, a model at
or below --ref-budget skips SNL, and --resume picks up every stage already finished in the out dir (BCD from its
last step). With no arguments it runs a small offline demo on the embedded digits dataset.

Everything that can be wrong with the input is checked before the out dir is touched; such errors print one line,
`fastmask-linearize: error: ...`, and exit non-zero.
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path
from typing import Optional, Sequence

from . import config as settings
from .errors import FastmaskError

PROG = "fastmask-linearize"


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage, so every bad input ends as the same one-line error."""

    def error(self, message: str):
        raise FastmaskError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description=__doc__.split("\n\n")[0],
                epilog="With no arguments: the offline digits demo (a few minutes on 2 CPU cores).")
    # Every default is None: unset flags must not override --config values (defaults live in fastmask.config).
    p.add_argument("--config", help="YAML file of settings (same names as the flags, with _); flags override it")
    p.add_argument("--dataset", help="digits (default, offline), cifar10, cifar100, tinyimagenet, or npz:<path>")
    p.add_argument("--data-dir", help="folder holding the dataset (cifar/tinyimagenet)")
    p.add_argument("--arch", help="resnet18 or wide_resnet22_8 (default: the checkpoint's, else resnet18)")
    p.add_argument("--width", type=int, help="channel width of the first stage (resnet18: 64, wrn: 128)")
    p.add_argument("--checkpoint", help="trained model (.safetensors from fastmask); without it a baseline is trained")
    p.add_argument("--teacher", help="model to distill from during SNL and finetunes (default: the full-ReLU "
                                     "baseline when the run has one)")
    p.add_argument("--ref-budget", type=int, help="B_ref: SNL cuts the model to this many ReLUs before BCD")
    p.add_argument("--targets", help="ReLU budgets for BCD, strictly descending, e.g. 20000,15000,9000")
    p.add_argument("--drc", type=int, help="ReLUs removed per BCD step (paper: 100)")
    p.add_argument("--rt", type=int, help="random tries per step (paper: 50)")
    p.add_argument("--adt", type=float, help="accuracy degradation tolerance, accuracy points (paper: 0.3)")
    p.add_argument("--criterion", choices=["accuracy", "loss"], help="drop measured in accuracy or in loss")
    p.add_argument("--finetune-epochs", type=int, help="finetune epochs per BCD step (paper: 20 CIFAR, 5 TinyImageNet)")
    p.add_argument("--finetune-optimizer", choices=["sgd", "adam"], help="default: sgd for resnet, adam for wrn")
    p.add_argument("--finetune-lr", type=float, help="default: 1e-3 (sgd) or 3.5e-5 (adam)")
    p.add_argument("--baseline-epochs", type=int, help="epochs of baseline training when there is no checkpoint")
    p.add_argument("--snl-epochs", type=int, help="most epochs SNL may spend reaching B_ref")
    p.add_argument("--snl-lr", type=float, help="SNL's Adam lr on weights and alphas (SNL: 1e-3)")
    p.add_argument("--snl-lambda0", type=float, help="SNL's initial L1 weight (SNL: 1e-5)")
    p.add_argument("--snl-finetune-epochs", type=int, help="finetune epochs after SNL binarizes (SNL: 100)")
    p.add_argument("--score-subset", type=int, help="train images BCD scores on (0 = the whole train split)")
    p.add_argument("--val-size", type=float, help="validation images carved from train (count, or fraction < 1)")
    p.add_argument("--seed", type=int, help="seed of the split, training and candidate sampling")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--out", help="output folder")
    p.add_argument("--resume", action="store_true", default=None, help="continue the run in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """Warnings are advice to the user (e.g. ADT below the scoring noise): one line, no source excerpt."""
    return f"[{PROG}] warning: {message}\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        with warnings.catch_warnings():
            warnings.formatwarning = _one_line_warning
            run(list(sys.argv[1:] if argv is None else argv))
    except FastmaskError as err:
        message = " ".join(str(err).split())  # one line, whatever the message held
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; rerun with --resume to continue", file=sys.stderr)
        return 130
    except SystemExit as done:  # --help
        return int(done.code or 0)
    return 0


# ---- preparation: every check, nothing written --------------------------------------------------------------------
class Plan:
    """Everything the run needs, checked: resolved config, dataset, the starting model and where each stage is."""

    def __init__(self, config: dict, resume: bool, progress: bool):
        self.config = config
        self.resume = resume
        self.progress = progress
        self.out = Path(config["out"])
        self.dataset = None
        self.model = None  # the model the run starts from (checkpoint, or a fresh one to train)
        self.teacher = None
        self.trains_baseline = False
        self.device = None


def _resolve_device(requested: Optional[str]) -> str:
    import torch

    if requested in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(requested)
    except RuntimeError as err:
        raise FastmaskError(f"unknown device {requested!r} ({err})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FastmaskError(f"device {requested} asked for, but CUDA is not available here; use --device cpu")
    return str(device)


def prepare(argv: Sequence[str]) -> Plan:
    import torch

    from . import checkpoint, data, models
    from .masks import MaskSet
    from .search.bcd import BCDConfig

    args = build_parser().parse_args(argv)
    flags = {k: v for k, v in vars(args).items() if k not in ("config", "quiet")}
    yaml_values = settings.read_yaml(args.config) if args.config else {}
    config = settings.check(settings.resolve(flags, yaml_values))
    plan = Plan(config, bool(args.resume), progress=not args.quiet)
    plan.device = _resolve_device(config["device"])
    config["device"] = plan.device

    if config["data_dir"] is not None and not Path(config["data_dir"]).is_dir():
        raise FastmaskError(f"data dir {config['data_dir']} does not exist; point --data-dir at the dataset folder")
    for key in ("checkpoint", "teacher"):
        if config[key] is not None and not Path(config[key]).is_file():
            raise FastmaskError(f"{key} {config[key]} does not exist")
    plan.dataset = data.load_dataset(config["dataset"], config["data_dir"], val_size=_val_size(config["val_size"]),
                                     seed=config["seed"])
    settings.check_targets(config)
    expected = {"num_classes": plan.dataset.num_classes, "image_size": plan.dataset.image_size,
                "in_channels": plan.dataset.in_channels, "arch": config["arch"], "width": config["width"]}

    if config["checkpoint"] is not None:
        spec, _ = checkpoint.read_spec(config["checkpoint"])
        checkpoint.check_spec(spec, expected, config["checkpoint"])
        config["arch"], config["width"] = spec["arch"], spec["width"]
        plan.model = checkpoint.load_model(config["checkpoint"], device=plan.device)
    else:
        config["arch"] = config["arch"] or "resnet18"
        config["width"] = config["width"] or models.default_width(config["arch"])
        torch.manual_seed(config["seed"])  # the baseline's initial weights follow the seed
        plan.model = models.create(config["arch"], plan.dataset.num_classes, plan.dataset.image_size,
                                   width=config["width"], in_channels=plan.dataset.in_channels).to(plan.device)
        plan.trains_baseline = True
    if config["teacher"] is not None:
        plan.teacher = checkpoint.load_model(config["teacher"], expected={"num_classes": plan.dataset.num_classes},
                                             device=plan.device)

    masks = MaskSet(plan.model)
    count = masks.count()
    ref_budget = config["ref_budget"]
    start = count if ref_budget is None else min(count, ref_budget)
    BCDConfig(targets=config["targets"], drc=config["drc"], rt=config["rt"], adt=config["adt"],
              criterion=config["criterion"], seed=config["seed"]).validate(start)
    _check_out_dir(plan)
    return plan


def _val_size(value: float):
    return int(value) if value >= 1 else float(value)


def _check_out_dir(plan: Plan) -> None:
    saved = settings.load_saved(plan.out / "config.yaml")
    if plan.out.exists() and not plan.out.is_dir():
        raise FastmaskError(f"out {plan.out} is a file; choose a folder")
    if saved is None:
        if plan.out.is_dir() and any(plan.out.iterdir()) and not plan.resume:
            raise FastmaskError(f"out dir {plan.out} is not empty and holds no fastmask run; choose another --out")
        return
    if settings.comparable(saved) != settings.comparable(plan.config):
        differing = [k for k, v in settings.comparable(plan.config).items() if saved.get(k) != v]
        raise FastmaskError(f"out dir {plan.out} holds a different run (its config.yaml differs in "
                            f"{', '.join(differing)}); choose another --out"
                            + ("" if plan.resume else " or pass the same settings with --resume"))
    if not plan.resume:
        raise FastmaskError(f"out dir {plan.out} already holds this run; pass --resume to continue it or choose "
                            "another --out")


# ---- the stages -----------------------------------------------------------------------------------------------
def run(argv: Sequence[str]) -> dict:
    from . import report

    started = time.perf_counter()
    plan = prepare(argv)
    log = _logger()
    plan.out.mkdir(parents=True, exist_ok=True)
    report.atomic_write_text(plan.out / "config.yaml", settings.dump(plan.config))
    log(f"{plan.dataset}; device {plan.device}; out {plan.out}")

    summary = {"config": plan.config, "machine": report.machine()}
    baseline = _baseline_stage(plan, log)
    if baseline:
        summary["baseline"] = baseline
    snl = _snl_stage(plan, log)
    if snl:
        summary["snl"] = snl
    summary["start"] = _measure(plan, plan.model)
    result = _bcd_stage(plan, log)
    summary["targets"] = result.targets
    summary["bcd"] = _bcd_totals(result.history)
    summary["warnings"] = result.warnings
    summary["snl_points"] = [snl] if snl else []
    summary["seconds"] = time.perf_counter() - started
    written = report.write_report(plan.out, summary, result.history)
    for target in result.targets:
        log(f"target {target['budget']}: val {target['val_acc']:.2f}%, test {target['test_acc']:.2f}%")
    log(f"done in {summary['seconds']:.0f}s; report: {', '.join(str(p.relative_to(plan.out)) for p in written)}")
    return summary


def _logger():
    def log(message: str) -> None:
        print(f"[{PROG}] {message}", flush=True)
    return log


def _measure(plan: Plan, model) -> dict:
    from . import train
    from .nn import relu_count

    val = train.evaluate(model, plan.dataset.val_x, plan.dataset.val_y, plan.dataset, plan.device)
    test = train.evaluate(model, plan.dataset.test_x, plan.dataset.test_y, plan.dataset, plan.device)
    return {"relu_count": relu_count(model), "val_acc": val[0], "val_loss": val[1], "test_acc": test[0],
            "test_loss": test[1]}


def _load_stage(path: Path, plan: Plan) -> Optional[dict]:
    """A stage's saved result when resuming (model loaded into plan.model), else None."""
    from . import checkpoint

    if not (plan.resume and path.is_file()):
        return None
    plan.model = checkpoint.load_model(path, device=plan.device)
    return checkpoint.read_spec(path)[1]


def _baseline_stage(plan: Plan, log) -> Optional[dict]:
    from . import checkpoint, train

    if not plan.trains_baseline:
        if plan.teacher is None and _all_present(plan.model):
            plan.teacher = _frozen_copy(plan.model)  # a full-ReLU checkpoint is the natural teacher
        return None
    path = plan.out / "baseline" / "model.safetensors"
    saved = _load_stage(path, plan)
    if saved is not None:
        log(f"baseline: loaded from {path}")
    else:
        epochs = plan.config["baseline_epochs"]
        log(f"baseline: training {plan.config['arch']} (width {plan.config['width']}) for {epochs} epochs")
        t0 = time.perf_counter()
        config = train.baseline_config(epochs)
        config.seed = plan.config["seed"]
        train.train(plan.model, plan.dataset, config, plan.device, progress=plan.progress)
        saved = {**_measure(plan, plan.model), "seconds": time.perf_counter() - t0, "epochs": epochs}
        checkpoint.save_model(plan.model, path, extra=saved)
        log(f"baseline: val {saved['val_acc']:.2f}%, test {saved['test_acc']:.2f}% in {saved['seconds']:.0f}s")
    if plan.teacher is None:
        plan.teacher = _frozen_copy(plan.model)
    return saved


def _snl_stage(plan: Plan, log) -> Optional[dict]:
    from . import checkpoint
    from .masks import MaskSet
    from .nn import relu_count
    from .search.snl import SNLConfig, run_snl

    budget = plan.config["ref_budget"]
    if budget is None or relu_count(plan.model) <= budget:
        return None
    path = plan.out / "snl" / "model.safetensors"
    saved = _load_stage(path, plan)
    if saved is not None:
        log(f"SNL: loaded the model at {budget} ReLUs from {path}")
        return saved
    log(f"SNL: {relu_count(plan.model)} -> {budget} ReLUs")
    t0 = time.perf_counter()
    snl_config = SNLConfig(budget=budget, lr=plan.config["snl_lr"], lambda0=plan.config["snl_lambda0"],
                           max_epochs=plan.config["snl_epochs"],
                           finetune_epochs=plan.config["snl_finetune_epochs"], seed=plan.config["seed"],
                           finetune_lr=plan.config["finetune_lr"],
                           finetune_optimizer=plan.config["finetune_optimizer"])
    history = run_snl(plan.model, plan.dataset, snl_config, plan.device, teacher=plan.teacher,
                      progress=plan.progress)
    saved = {"budget": budget, **_measure(plan, plan.model), "seconds": time.perf_counter() - t0,
             "snl_epochs": history["snl_epochs"], "reached_budget": history["reached_budget"],
             "val_acc_after_binarize": history["val_acc_after_binarize"]}
    checkpoint.save_model(plan.model, path, extra=saved)
    MaskSet(plan.model).save(path.with_name("masks.safetensors"))
    log(f"SNL: {budget} ReLUs after {history['snl_epochs']} epochs; val {saved['val_acc']:.2f}%, "
        f"test {saved['test_acc']:.2f}%")
    return saved


def _bcd_stage(plan: Plan, log):
    from . import report, train
    from .nn import relu_count
    from .search.bcd import BCDConfig, run_bcd

    c = plan.config
    bcd_config = BCDConfig(targets=c["targets"], drc=c["drc"], rt=c["rt"], adt=c["adt"], criterion=c["criterion"],
                           seed=c["seed"])
    finetune = train.finetune_config(c["arch"], c["finetune_epochs"], lr=c["finetune_lr"],
                                     optimizer=c["finetune_optimizer"])

    def on_step(record: dict, driver) -> None:  # the step table stays current while the run goes
        report.write_steps_csv(plan.out / "steps.csv", driver.history)

    log(f"BCD: {plan.model.fastmask_spec['arch']} from {relu_count(plan.model)} ReLUs to "
        f"{', '.join(map(str, c['targets']))}; DRC {c['drc']}, RT {c['rt']}, ADT {c['adt']} ({c['criterion']}), "
        f"{c['finetune_epochs']} finetune epochs per step")
    return run_bcd(plan.model, plan.dataset, bcd_config, plan.device, plan.out, finetune_config=finetune,
                   score_subset=c["score_subset"], teacher=plan.teacher, resume=plan.resume, on_step=on_step,
                   progress=plan.progress, log=log)


def _bcd_totals(history: list[dict]) -> dict:
    return {"steps": len(history), "fallbacks": sum(bool(r["fallback"]) for r in history),
            "tries_scored": sum(int(r["tries_scored"]) for r in history),
            "seconds_scoring": sum(r["seconds_scoring"] for r in history),
            "seconds_finetune": sum(r["seconds_finetune"] for r in history)}


def _all_present(model) -> bool:
    from .masks import MaskSet

    masks = MaskSet(model)
    return masks.count() == masks.total()


def _frozen_copy(model):
    import copy

    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


if __name__ == "__main__":
    sys.exit(main())
