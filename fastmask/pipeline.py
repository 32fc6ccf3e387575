"""The pipeline as a library: baseline -> SNL to B_ref -> BCD through the targets -> report.

    from fastmask.config import resolve, validate
    from fastmask.pipeline import Pipeline
    summary = Pipeline.prepare(validate(resolve({"bcd.targets": [2000, 1200]}))).run()

Each stage runs only when its inputs do not already give its output: a checkpoint skips the baseline, a model at or
below the reference budget skips SNL, and `resume` picks up every stage already finished in the out dir (BCD from its
last step). prepare() checks everything that can be wrong with the input before the out dir is touched.
"""
from __future__ import annotations

import copy
import math
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn

from . import __version__, checkpoint, cost, data, distributed, models, report, train
from . import config as settings
from .checkpoint import model_spec
from .config import RunConfig
from .errors import FastmaskError, UnknownSettings
from .masks import MaskSet
from .models import external
from .nn import relu_count
from .search import polynomial, snl
from .search.bcd import BCDResult, run_bcd
from .search.compute import image_passes, images_spent

# The stages before the search, in order: Pipeline.run(stop_after=...) may end after either.
STAGES_BEFORE_SEARCH = ("baseline", "snl")


def resolve_device(requested: Optional[str]) -> str:
    if requested in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(requested)
    except RuntimeError as err:
        raise FastmaskError(f"unknown device {requested!r} ({err})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FastmaskError(f"device {requested} asked for, but CUDA is not available here; use --device cpu")
    return str(device)


def frozen_copy(model: nn.Module) -> nn.Module:
    """A teacher: an eval-mode copy whose parameters take no gradient."""
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def run_dataset(config: RunConfig) -> data.Dataset:
    """The dataset a run trains and measures on: its data settings, the val split chosen by its seed."""
    val_size = config.data.val_size
    return data.load_dataset(config.data.dataset, config.data.data_dir,
                             val_size=int(val_size) if val_size >= 1 else float(val_size), seed=config.seed,
                             image_size=config.data.image_size, mean=config.data.mean, std=config.data.std)


class Pipeline:
    """One run: a checked config, its dataset, the model it starts from, and the stages that take it down."""

    def __init__(self, config: RunConfig, dataset: data.Dataset, model: nn.Module, *, trains_baseline: bool,
                 teacher: Optional[nn.Module] = None, resume: bool = False, progress: bool = True,
                 log: Callable[[str], None] = print, group: Optional[distributed.Group] = None):
        self.config = config
        self.group = group
        self.is_main = distributed.is_main(group)
        self.dataset = dataset
        self.model = model
        self.trains_baseline = trains_baseline
        self.teacher = teacher
        self.resume = resume
        self.progress = progress and self.is_main
        self.log = log if self.is_main else (lambda message: None)
        self.device = config.device
        self.out = Path(config.out)

    # ---- preparation: every check, nothing written ---------------------------------------------------------
    @classmethod
    def prepare(cls, config: RunConfig, *, resume: bool = False, progress: bool = True,
                log: Callable[[str], None] = print, dataset: Optional[data.Dataset] = None,
                model: Optional[nn.Module] = None, trained: bool = True) -> "Pipeline":
        """The checked run. `dataset` and `model` (with a fastmask spec: built by fastmask.models, or converted)
        replace the config's dataset and model, for fastmask.linearize; `trained` says whether that model skips the
        baseline. Stages resumed from the out dir are then loaded into copies of `model`."""
        settings.validate(config)
        config.device = resolve_device(config.device)
        group = distributed.from_environment(config.device)  # None unless started by torchrun
        config.device = distributed.device_for(group, config.device)
        device = config.device
        if config.data.data_dir is not None and not Path(config.data.data_dir).is_dir():
            raise FastmaskError(f"data dir {config.data.data_dir} does not exist; point --data-dir at the dataset "
                                "folder")
        for name in ("checkpoint", "teacher"):
            path = getattr(config.model, name)
            if path is not None and not Path(path).is_file():
                raise FastmaskError(f"{name} {path} does not exist")
        arch = config.model.arch
        if arch is not None and not external.is_builtin(arch):
            config.model.arch = arch = external.canonical(arch)
            if config.model.width is not None:
                raise FastmaskError(f"--width sets the channels of the built-in archs; {arch} has its own")
            external.resolve_builder(arch)  # a builder that cannot be imported fails before the data is read
        dataset = dataset if dataset is not None else run_dataset(config)
        dims = {"num_classes": dataset.num_classes, "image_size": dataset.image_size,
                "in_channels": dataset.in_channels}
        expected = {**dims, "arch": config.model.arch, "width": config.model.width}
        path = config.model.checkpoint
        template = None
        if model is not None:
            spec = model_spec(model)
            checkpoint.check_spec(spec, dims, "the given model")
            config.model.arch, config.model.width = spec["arch"], spec.get("width")
            template = copy.deepcopy(model).cpu()
            model = model.to(device)
        elif path is not None and checkpoint.is_fastmask_checkpoint(path):
            spec, _ = checkpoint.read_spec(path)
            checkpoint.check_spec(spec, expected, path)
            config.model.arch, config.model.width = spec["arch"], spec["width"]
            model = checkpoint.load_model(path, device=device)
        elif path is not None:  # the user's own weights: a state_dict for --arch
            if config.model.arch is None:
                raise FastmaskError(f"checkpoint {path} is a plain state_dict, not a fastmask checkpoint: name its "
                                    "model with --arch (e.g. --arch torchvision:resnet50 or --arch my_model.py:build)")
            model = checkpoint.load_weights(path, config.model.arch, **dims).to(device)
            config.model.width = model_spec(model)["width"]
        elif not external.is_builtin(config.model.arch):
            torch.manual_seed(config.seed)  # the baseline's initial weights follow the seed
            model = external.build(config.model.arch, **dims).to(device)
        else:
            config.model.arch = config.model.arch or "resnet18"
            config.model.width = config.model.width or models.default_width(config.model.arch)
            torch.manual_seed(config.seed)  # the baseline's initial weights follow the seed
            model = models.create(config.model.arch, dataset.num_classes, dataset.image_size,
                                  width=config.model.width, in_channels=dataset.in_channels).to(device)
        if not external.is_builtin(config.model.arch) and distributed.is_main(group):
            others = external.other_activations(model)
            log(f"model: {config.model.arch}, {len(MaskSet(model).sites)} ReLU sites, {MaskSet(model).total():,} "
                "ReLUs; other activations, left as they are: "
                + (", ".join(f"{n} {k}" for k, n in sorted(others.items())) or "none"))
        teacher = None
        if config.model.teacher is not None:
            teacher = checkpoint.load_any(config.model.teacher, config.model.arch, **dims, device=device)
        count = MaskSet(model).count()
        ref_budget = config.snl.ref_budget
        config.bcd.validate(count if ref_budget is None else min(count, ref_budget))
        trains = (not trained) if template is not None else config.model.checkpoint is None
        pipeline = cls(config, dataset, model, trains_baseline=trains, teacher=teacher,
                       resume=resume, progress=progress, log=log, group=group)
        pipeline.template = template
        pipeline._check_out_dir()
        if group is not None:  # every process has read the out dir before rank 0 writes to it
            group.barrier()
        return pipeline

    def _check_out_dir(self) -> None:
        if self.out.exists() and not self.out.is_dir():
            raise FastmaskError(f"out {self.out} is a file; choose a folder")
        try:
            saved = settings.load_saved(self.out / "config.yaml")
        except UnknownSettings as err:
            raise FastmaskError(f"out dir {self.out} holds a run of another fastmask version (its config.yaml sets "
                                f"{', '.join(err.names)}, which fastmask {__version__} does not have); choose "
                                "another --out") from None
        except FastmaskError:
            raise FastmaskError(f"out dir {self.out} holds a config.yaml that is not a fastmask run; choose another "
                                "--out") from None
        if saved is None:
            if self.out.is_dir() and any(self.out.iterdir()):
                raise FastmaskError(f"out dir {self.out} is not empty and holds no fastmask run"
                                    + (" to resume" if self.resume else "") + "; choose another --out")
            return
        mine, theirs = settings.comparable(self.config), settings.comparable(saved)
        if mine != theirs:
            differing = [settings.SETTINGS[p].flag for p in mine if mine[p] != theirs[p]]
            raise FastmaskError(f"out dir {self.out} holds a different run (its config.yaml differs in "
                                f"{', '.join(differing)}); choose another --out"
                                + ("" if self.resume else " or pass the same settings with --resume"))
        if not self.resume:
            raise FastmaskError(f"out dir {self.out} already holds this run; pass --resume to continue it or choose "
                                "another --out")

    template: Optional[nn.Module] = None

    def load(self, path: Path) -> nn.Module:
        """A model this run saved: rebuilt from its spec, or loaded into a copy of the model the run was given."""
        if self.template is None:
            return checkpoint.load_model(path, device=self.device)
        return checkpoint.load_into(copy.deepcopy(self.template), path, device=self.device)

    # ---- the run ------------------------------------------------------------------------------------------
    def run(self, stop_after: Optional[str] = None) -> dict:
        """Every stage, then the report; returns the summary. stop_after="baseline" or "snl" ends the run after that
        stage (its model saved in the out dir, no report): a later run of the same settings with `resume` loads it
        and goes on, so a start shared by several searches is made once, before them."""
        if stop_after not in STAGES_BEFORE_SEARCH + (None,):
            raise ValueError(f"stop_after must be one of {STAGES_BEFORE_SEARCH} or None, not {stop_after!r}")
        started = time.perf_counter()
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            report.atomic_write_text(self.out / "config.yaml", settings.dump(self.config))
        processes = "" if self.group is None else f"; {self.group.size} processes ({self.group.backend})"
        self.log(f"{self.dataset}; device {self.device}{processes}; out {self.out}")
        summary = {"config": settings.to_dict(self.config), "machine": report.machine()}
        if self.group is not None:
            summary["processes"] = {"count": self.group.size, "backend": self.group.backend}
        baseline = self.baseline_stage()
        if baseline:
            summary["baseline"] = baseline
        if stop_after == "baseline":
            return summary
        self.replacement_stage()
        reference = self.snl_stage()
        if reference:
            summary["snl"] = reference
        if stop_after == "snl":
            return summary
        summary["start"] = self.measure(self.model)
        method = self.config.method
        start_model = copy.deepcopy(self.model) if method == "both" else self.model
        history: list[dict] = []
        summary["compute"] = {}
        if method in ("bcd", "both"):
            result = self.bcd_stage()
            history = result.history
            summary["targets"] = result.targets
            summary["bcd"] = bcd_totals(result.history)
            summary["warnings"] = result.warnings
            summary["compute"]["bcd"] = summary["bcd"]["compute"]
        if method in ("snl", "both"):
            summary["snl_targets"] = self.snl_targets_stage(start_model, summary.get("targets"))
            # Each target's SNL run starts again from B_ref: its compute is per target, next to BCD's to that target.
            summary["compute"]["snl_per_target"] = {str(t["budget"]): images_spent([t])
                                                    for t in summary["snl_targets"]}
        summary["snl_points"] = ([reference] if reference else []) + summary.get("snl_targets", [])
        summary["seconds"] = time.perf_counter() - started
        if self.group is not None:  # the last word on what every process holds
            digest = distributed.masks_digest(self.model)
            self.group.check_same("final masks", digest)
            summary["processes"]["masks_sha256"] = digest
        if not self.is_main:
            return summary
        written = report.write_report(self.out, summary, history)
        for name, key in (("BCD", "targets"), ("SNL", "snl_targets")):
            for target in summary.get(key, []):
                seconds = report.latency(target, cost.DEFAULT_PROTOCOL)  # None for a target resumed from an older run
                wan = "" if seconds is None else f", {seconds:.2f}s per image on the WAN ({cost.DEFAULT_PROTOCOL})"
                self.log(f"{name} at {target['budget']}: val {target['val_acc']:.2f}%, test {target['test_acc']:.2f}%"
                         + wan)
        self.log(f"done in {summary['seconds']:.0f}s; report: "
                 f"{', '.join(str(p.relative_to(self.out)) for p in written)}")
        return summary

    def measure(self, model: nn.Module) -> dict:
        """ReLU count, val and test accuracy and loss (test is reported, never used to choose anything), and the
        predicted private-inference cost (cost.summary: what the saved ReLUs buy), taken while the model is here."""
        val = train.evaluate(model, self.dataset.val_x, self.dataset.val_y, self.dataset, self.device)
        test = train.evaluate(model, self.dataset.test_x, self.dataset.test_y, self.dataset, self.device)
        return {"relu_count": relu_count(model), "val_acc": val[0], "val_loss": val[1], "test_acc": test[0],
                "test_loss": test[1], "cost": cost.summary(cost.workload(model))}

    def finetune_config(self, epochs: Optional[int] = None) -> train.TrainConfig:
        return train.finetune_recipe(self.config.finetune, self.config.model.arch, self.dataset.name, epochs)

    def _load_stage(self, path: Path) -> Optional[dict]:
        """A stage's saved result when resuming (its model becomes self.model), else None."""
        if not (self.resume and path.is_file()):
            return None
        self.model = self.load(path)
        return checkpoint.read_spec(path)[1]

    def baseline_stage(self) -> Optional[dict]:
        if not self.trains_baseline:
            if self.teacher is None and _all_present(self.model):
                self.teacher = frozen_copy(self.model)  # a full-ReLU checkpoint is the natural teacher
            return None
        path = self.out / "baseline" / "model.safetensors"
        saved = self._load_stage(path)
        if saved is not None:
            self.log(f"baseline: loaded from {path}")
        else:
            epochs = self.config.baseline.epochs
            width = "" if self.config.model.width is None else f" (width {self.config.model.width})"
            self.log(f"baseline: training {self.config.model.arch}{width} for {epochs} epochs")
            t0 = time.perf_counter()
            config = train.baseline_config(epochs)
            config.seed = self.config.seed
            train.train(self.model, self.dataset, config, self.device, progress=self.progress, group=self.group)
            saved = {**self.measure(self.model), "seconds": time.perf_counter() - t0, "epochs": epochs}
            if self.is_main:
                checkpoint.save_model(self.model, path, extra=saved)
            self.log(f"baseline: val {saved['val_acc']:.2f}%, test {saved['test_acc']:.2f}% in "
                     f"{saved['seconds']:.0f}s")
        if self.teacher is None:
            self.teacher = frozen_copy(self.model)
        return saved

    def snl(self, model: nn.Module, budget: int) -> dict:
        """SNL on `model` in place down to exactly `budget` ReLUs, with this run's settings, teacher and seed;
        returns its measurements."""
        t0 = time.perf_counter()
        s = self.config.snl
        history = snl.run_snl(model, self.dataset, budget, s, self.device, seed=self.config.seed,
                              finetune=self.finetune_config(s.finetune_epochs) if s.finetune_epochs > 0 else None,
                              teacher=self.teacher, progress=self.progress, group=self.group)
        return {"budget": budget, **self.measure(model), "seconds": time.perf_counter() - t0,
                "snl_epochs": history["snl_epochs"], "reached_budget": history["reached_budget"],
                "val_acc_after_binarize": history["val_acc_after_binarize"]}

    def snl_stage(self) -> Optional[dict]:
        budget = self.config.snl.ref_budget
        if budget is None or relu_count(self.model) <= budget:
            return None
        path = self.out / "snl" / "model.safetensors"
        saved = self._load_stage(path)
        if saved is not None:
            self.log(f"SNL: loaded the model at {budget} ReLUs from {path}")
            return saved
        self.log(f"SNL: {relu_count(self.model)} -> {budget} ReLUs")
        saved = self.snl(self.model, budget)
        self.save_with_masks(self.model, path, saved)
        self.log(f"SNL: {budget} ReLUs after {saved['snl_epochs']} epochs; val {saved['val_acc']:.2f}%, "
                 f"test {saved['test_acc']:.2f}%")
        return saved

    def scoring_images(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The fixed, non-augmented train subset candidates are scored on (and polynomials are fitted on)."""
        return data.scoring_subset(self.dataset, self.config.bcd.score_subset, self.device, seed=self.config.seed)

    def replacement_stage(self) -> None:
        """--replacement polynomial: every site whose input is a BatchNorm's output gets per-channel coefficients,
        fitted by least squares to ReLU over its inputs on the scoring subset, before SNL, so SNL's alpha phase and
        every finetune train them."""
        if self.config.replacement != "polynomial":
            return
        if any(site.coeffs is not None for site in MaskSet(self.model).sites):
            return  # a checkpoint or a resumed stage that already carries them
        images, _ = self.scoring_images()
        fits = polynomial.fit_polynomial(self.model, images, batch_size=self.config.bcd.score_batch_size)
        gain = sum(f["mse_identity"] for f in fits) / max(sum(f["mse_fit"] for f in fits), 1e-12)
        self.log(f"replacement: per-channel polynomials fitted at {len(fits)} sites (squared error to ReLU "
                 f"{gain:.1f}x below the identity's)")

    def finetune(self, model: nn.Module, epochs: int, max_steps: Optional[int] = None) -> int:
        """Finetunes `model` with this run's recipe and teacher; returns the images it trained on."""
        config = self.finetune_config(epochs)
        config.seed = self.config.seed
        rows = train.train(model, self.dataset, config, self.device, teacher=self.teacher, progress=self.progress,
                           max_steps=max_steps, group=self.group)
        return int(rows[-1]["images"]) if rows else 0

    def steps_for_images(self, images: int) -> int:
        """The fewest finetune steps that train on at least `images` images (an epoch ends in a partial batch)."""
        if images <= 0:
            return 0
        n = len(self.dataset.train_y)
        batch = self.finetune_config().batch_size
        epochs, rest = divmod(images, n)
        return epochs * data.steps_per_epoch(n, batch) + math.ceil(rest / batch)

    def snl_targets_stage(self, start: nn.Module, bcd_targets: Optional[list[dict]]) -> list[dict]:
        """SNL from the B_ref model straight to each target (alpha phase, binarize at the target, finetune).

        Next to BCD (--method both) the finetune gets what keeps the compute equal: BCD's images (trained on plus
        pushed forward, to that target) minus the images SNL's alpha phase trained on. Alone, it finetunes for
        --snl-finetune-epochs."""
        rows = []
        per_epoch = data.steps_per_epoch(len(self.dataset.train_y), self.finetune_config().batch_size)
        for budget in self.config.bcd.targets:
            path = self.out / "snl_targets" / str(budget) / "model.safetensors"
            if self.resume and path.is_file():
                rows.append(checkpoint.read_spec(path)[1])
                self.log(f"SNL to {budget}: loaded from {path}")
                continue
            self.log(f"SNL: {relu_count(start)} -> {budget} ReLUs")
            model = copy.deepcopy(start)
            t0 = time.perf_counter()
            history = snl.run_snl(model, self.dataset, budget, self.config.snl, self.device, seed=self.config.seed,
                                  max_epochs=self.config.snl.target_epochs, teacher=self.teacher,
                                  progress=self.progress, group=self.group)
            alpha_images = int(history["alpha_images"])
            bcd = next((t for t in bcd_targets or [] if t["budget"] == budget), None)
            if bcd is not None:
                bcd_images = image_passes([bcd])
                if alpha_images > bcd_images:
                    self.log(f"SNL to {budget}: its alpha phase alone trained on {alpha_images} images, more than "
                             f"BCD's {bcd_images}: no finetune, and SNL had more compute than BCD here")
                steps = self.steps_for_images(bcd_images - alpha_images)
                finetune_images = self.finetune(model, math.ceil(steps / per_epoch), steps) if steps else 0
            else:
                epochs = self.config.snl.finetune_epochs
                finetune_images = self.finetune(model, epochs) if epochs else 0
            row = {"budget": budget, **self.measure(model), "seconds": time.perf_counter() - t0,
                   "snl_epochs": history["snl_epochs"], "reached_budget": history["reached_budget"],
                   "alpha_images": alpha_images, "finetune_images": finetune_images,
                   "train_images": alpha_images + finetune_images, "forward_images": 0,
                   "per_site": MaskSet(model).per_site()}
            self.save_with_masks(model, path, row)
            self.log(f"SNL at {budget}: val {row['val_acc']:.2f}%, test {row['test_acc']:.2f}% "
                     f"({history['snl_epochs']} alpha epochs, {finetune_images} finetune images)")
            rows.append(row)
        return rows

    def bcd_stage(self) -> BCDResult:
        def on_step(record: dict, driver) -> None:  # the step table stays current while the run goes (rank 0)
            report.write_steps_csv(self.out / "steps.csv", driver.history)

        self.log(f"BCD: {self.config.model.arch} from {relu_count(self.model)} ReLUs; "
                 f"{settings.describe(self.config.bcd)}; {settings.describe(self.config.finetune)}")
        return run_bcd(self.model, self.dataset, self.config.bcd, self.device, self.out, seed=self.config.seed,
                       finetune=self.config.finetune, teacher=self.teacher, resume=self.resume, on_step=on_step,
                       progress=self.progress, log=self.log, group=self.group)

    def save_with_masks(self, model: nn.Module, path: Path, extra: dict) -> None:
        """A stage's model (with its measurements) and, beside it, its masks alone (masks.safetensors + .json);
        written by rank 0 alone under torchrun."""
        if self.is_main:
            checkpoint.save_model(model, path, extra=extra)
            MaskSet(model).save(path.with_name("masks.safetensors"))


def bcd_totals(history: list[dict]) -> dict:
    return {"steps": len(history), "fallbacks": sum(bool(r["fallback"]) for r in history),
            "tries_scored": sum(int(r["tries_scored"]) for r in history),
            "seconds_scoring": sum(r["seconds_scoring"] for r in history),
            "seconds_finetune": sum(r["seconds_finetune"] for r in history),
            "compute": images_spent(history)}


def _all_present(model: nn.Module) -> bool:
    masks = MaskSet(model)
    return masks.count() == masks.total()
