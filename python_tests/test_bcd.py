"""The BCD driver (fastmask/search/bcd.py): budgets, acceptance rule, reference re-measurement, determinism, resume.

Tiny models (resnet18 at width 2 on 8x8 inputs, 960 ReLUs) and synthetic data keep this fast; the finetune is a few
SGD steps that also draw from torch's global RNG, so a resume that forgot to restore that state would be caught.
"""
from __future__ import annotations

import dataclasses
import json
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import fastmask as fm
from fastmask import train as training
from fastmask.errors import FastmaskError
from fastmask.masks import MaskSet
from fastmask.search import bcd, racing, scoring
from fastmask.search.bcd import BCD, BCDConfig

# The paper's Algorithm 2: uniform candidates, scored exactly in order with its stop rule.
PAPER_SEARCH = {"proposal": "uniform", "scoring": "exact"}


def tiny_model(seed: int = 0):
    torch.manual_seed(seed)
    return fm.models.create("resnet18", 10, 8, width=2, in_channels=1)


@pytest.fixture
def data():
    generator = torch.Generator().manual_seed(1)
    return torch.randn(64, 1, 8, 8, generator=generator), torch.randint(0, 10, (64,), generator=generator)


def two_steps(model, images, labels, optimizer, step):
    """Two optimizer steps on batches drawn from a per-step seed."""
    generator = torch.Generator().manual_seed(100 + step)
    model.train()
    for _ in range(2):
        index = torch.randperm(len(labels), generator=generator)[:32]
        loss = F.cross_entropy(model(images[index]), labels[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def sgd_finetune(images, labels, calls=None):
    def finetune(model, step):
        if calls is not None:
            calls.append(("finetune", step))
        two_steps(model, images, labels, torch.optim.SGD(model.parameters(), lr=0.05), step)
        with torch.no_grad():  # global RNG on purpose: resume must restore torch's RNG state too
            model.linear.bias.add_(1e-3 * torch.randn(10).to(model.linear.bias.device))
        return {"val_acc": 50.0, "val_loss": 2.0}
    return finetune


def run_driver(tmp_path, data, *, targets=(700, 455, 300), drc=100, rt=3, adt=0.3, seed=0, on_step=None,
               finetune=None, resume=False, model=None, criterion="accuracy"):
    images, labels = data
    model = model if model is not None else tiny_model()
    driver = BCD(model, BCDConfig(targets=list(targets), drc=drc, rt=rt, adt=adt, criterion=criterion),
                 images, labels, finetune or sgd_finetune(images, labels), tmp_path, seed=seed, on_step=on_step,
                 log=lambda message: None)
    with pytest.warns(RuntimeWarning) if not resume else _no_check():
        result = driver.run(resume=resume)
    return model, result


class _no_check:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def weights_equal(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ---- budgets ----------------------------------------------------------------------------------------------------
def test_plan_removal_takes_exactly_what_is_left():
    assert bcd.plan_removal(960, [700, 300], 100) == (700, 100)
    assert bcd.plan_removal(760, [700, 300], 100) == (700, 60)
    assert bcd.plan_removal(700, [700, 300], 100) == (300, 100)
    assert bcd.plan_removal(350, [700, 300], 500) == (300, 50)


def test_count_lands_exactly_on_every_target_and_each_is_saved(tmp_path, data):
    model, result = run_driver(tmp_path, data)
    assert MaskSet(model).count() == 300
    assert [t["budget"] for t in result.targets] == [700, 455, 300]
    removed = [r["removed"] for r in result.history]
    # 960 -> 700: 100, 100, 60; 700 -> 455: 100, 100, 45; 455 -> 300: 100, 55
    assert removed == [100, 100, 60, 100, 100, 45, 100, 55]
    for r in result.history:
        assert r["budget_before"] - r["budget_after"] == r["removed"]
        assert r["tries_scored"] >= 1 and r["accepted_index"] < r["tries_scored"]
    for target in result.targets:
        folder = tmp_path / "targets" / str(target["budget"])
        saved = fm.checkpoint.load_model(folder / "model.safetensors")
        assert fm.relu_count(saved) == target["budget"]
        masks = MaskSet(tiny_model())
        masks.load(folder / "masks.safetensors")
        assert masks.count() == target["budget"]
        assert (folder / "masks.safetensors.json").is_file()


def test_target_finetune_runs_once_per_target_and_is_counted(tmp_path, data):
    images, labels = data
    calls, step_finetune = [], sgd_finetune(images, labels)

    def finetune(model, step):
        return {**step_finetune(model, step), "train_images": 64}

    def target_finetune(model, step):
        calls.append((step, MaskSet(model).count()))
        return {**step_finetune(model, step), "val_acc": 61.0, "train_images": 1000}

    model = tiny_model()
    driver = BCD(model, BCDConfig(targets=[700, 455], drc=100, rt=3), images, labels, finetune, tmp_path,
                 target_finetune=target_finetune, evaluate_target=lambda m: {"val_acc": 61.0},
                 log=lambda message: None)
    with pytest.warns(RuntimeWarning):
        result = driver.run()
    # 960 -> 700 in steps 1-3, 700 -> 455 in steps 4-6: one extra finetune when each target is reached
    assert calls == [(3, 700), (6, 455)]
    assert [r["target_finetune_images"] for r in result.history] == [0, 0, 1000, 0, 0, 1000]
    # the step's finetune (64) + the informed proposal's cost pass over the 64 scoring images + the target's
    assert [r["train_images"] for r in result.history] == [128, 128, 1128, 128, 128, 1128]
    assert [t["train_images"] for t in result.targets] == [1384, 2 * 1384]
    assert result.history[2]["val_acc"] == 61.0  # the step reports the model as it was measured
    # a run with the target finetune is another run: its state does not resume without it
    with pytest.raises(FastmaskError, match="another run"):
        BCD(tiny_model(), BCDConfig(targets=[700, 455], drc=100, rt=3), images, labels, finetune, tmp_path,
            log=lambda message: None).run(resume=True)


def test_validate_rejects_bad_configs():
    for config, start in [(BCDConfig(targets=[900, 950]), 960), (BCDConfig(targets=[960]), 960),
                          (BCDConfig(targets=[500], drc=0), 960), (BCDConfig(targets=[500], rt=-1), 960),
                          (BCDConfig(targets=[500], adt=-0.1), 960), (BCDConfig(targets=[500], adt=math.nan), 960),
                          (BCDConfig(targets=[]), 960), (BCDConfig(targets=[500], criterion="f1"), 960)]:
        with pytest.raises(FastmaskError):
            config.validate(start)
    BCDConfig(targets=[959, 0]).validate(960)


# ---- the acceptance rule ----------------------------------------------------------------------------------------
def scores(acc, loss, scored=None, accepted=None):
    k = len(acc)
    scored = k if scored is None else scored
    accuracy = torch.tensor([a if i < scored else math.nan for i, a in enumerate(acc)], dtype=torch.float64)
    losses = torch.tensor([v if i < scored else math.nan for i, v in enumerate(loss)], dtype=torch.float64)
    return scoring.HypothesisScores(accuracy=accuracy, loss=losses, correct=torch.zeros(k, dtype=torch.int64),
                                    scored=scored, accepted=accepted)


def test_choose_accepted_vs_fallback_argmin_with_loss_tiebreak():
    reference = (80.0, 1.0)
    assert bcd.choose(scores([70, 79.9, 60], [2, 1, 3], scored=2, accepted=1), reference, "accuracy") == (1, False)
    # no candidate under ADT: smallest drop; 78 twice, the lower loss wins
    assert bcd.choose(scores([70, 78, 78, 60], [2, 1.5, 1.2, 3]), reference, "accuracy") == (2, True)
    # the loss criterion: drop = loss - reference loss
    assert bcd.choose(scores([70, 78, 60], [1.9, 1.4, 1.6]), reference, "loss") == (1, True)


@pytest.mark.parametrize("accepted", [None, 2])
def test_driver_applies_the_chosen_candidate(tmp_path, data, monkeypatch, accepted):
    """Scripted scores: the driver removes exactly the candidate the rule picks, and passes reference/adt/criterion
    to score_hypotheses."""
    seen = {}

    def fake_score(model, candidates, images, labels, *, reference=None, adt=None, criterion="accuracy", **kw):
        seen.update(candidates=[c.clone() for c in candidates], reference=reference, adt=adt, criterion=criterion)
        # candidate 3 has the smallest drop (fallback); candidate 2 is "under ADT" when the script says so
        return scores([50, 40, 45, 55, 30], [2, 2, 2, 1.8, 2.5], accepted=accepted,
                      scored=3 if accepted is not None else 5)

    monkeypatch.setattr(bcd, "score_hypotheses", fake_score)
    monkeypatch.setattr(bcd, "score_current", lambda *a, **k: (60.0, 1.5))
    images, labels = data
    model = tiny_model()
    before = MaskSet(model).flat()
    driver = BCD(model, BCDConfig(targets=[900], drc=60, rt=5, adt=0.3, criterion="accuracy", **PAPER_SEARCH),
                 images, labels, lambda m, step: {"val_acc": 1.0}, tmp_path, log=lambda message: None)
    with pytest.warns(RuntimeWarning):
        result = driver.run()
    removed = (before & ~MaskSet(model).flat()).nonzero().squeeze(1)
    expected = 2 if accepted is not None else 3
    assert torch.equal(removed, seen["candidates"][expected])
    assert seen["reference"] == (60.0, 1.5) and seen["adt"] == 0.3 and seen["criterion"] == "accuracy"
    assert len(seen["candidates"]) == 5 and all(c.numel() == 60 for c in seen["candidates"])
    record = result.history[0]
    assert record["fallback"] is (accepted is None)
    assert record["accepted_drop"] == pytest.approx(60.0 - (45 if accepted is not None else 55))
    assert record["tries_scored"] == (3 if accepted is not None else 5)
    # compute: the reference pass plus every candidate scored, on all 64 images
    assert record["forward_images"] == 64 * (1 + record["tries_scored"])


@pytest.mark.parametrize("accepted", [True, False])
def test_race_and_informed_candidates_drive_the_step(tmp_path, data, monkeypatch, accepted):
    """The default search: candidates come from propose() on removal_costs(), the race picks one, and the step log
    carries the race's image-forwards and the cost pass's images."""
    seen = {}
    real_propose = bcd.propose

    def spy_propose(costs, k, rt, generator, **kw):
        seen["proposed"] = real_propose(costs, k, rt, generator, **kw)
        seen["costs"] = costs
        return seen["proposed"]

    def fake_race(model, candidates, images, labels, **kw):
        seen["race"] = kw
        survivors = [1, 0]
        return racing.RaceResult(order=[1, 0, 2, 3], best=1, survivors=survivors, accuracy=[59.9, 50.0],
                                 loss=[1.6, 2.0], accepted=1 if accepted else None, forward_images=123)

    monkeypatch.setattr(bcd, "propose", spy_propose)
    monkeypatch.setattr(bcd, "race", fake_race)
    monkeypatch.setattr(bcd, "score_current", lambda *a, **k: (60.0, 1.5))
    images, labels = data
    model = tiny_model()
    before = MaskSet(model).flat()
    driver = BCD(model, BCDConfig(targets=[900], drc=60, rt=4, adt=0.3), images, labels,
                 lambda m, step: {"val_acc": 1.0, "train_images": 500}, tmp_path, log=lambda message: None)
    with pytest.warns(RuntimeWarning):
        result = driver.run()
    removed = (before & ~MaskSet(model).flat()).nonzero().squeeze(1)
    assert torch.equal(removed, seen["proposed"][1])
    assert seen["costs"].numel() == MaskSet(model).total() and len(seen["proposed"]) == 4
    assert seen["race"]["reference"] == (60.0, 1.5) and seen["race"]["adt"] == 0.3
    record = result.history[0]
    assert record["fallback"] is (not accepted) and record["accepted_drop"] == pytest.approx(0.1)
    assert record["forward_images"] == 64 + 123  # the reference pass + the race
    assert record["train_images"] == 500 + 64  # the finetune + the cost pass (forward and backward)
    assert result.targets[0]["forward_images"] == 187 and result.targets[0]["train_images"] == 564


@pytest.mark.parametrize("scoring_rule", ["race", "exact"])
def test_one_candidate_is_taken_unscored(tmp_path, data, monkeypatch, scoring_rule):
    """RT 1: whatever scoring would say, the one candidate goes in; no image is spent on it."""
    def never(*args, **kw):
        raise AssertionError("a lone candidate was scored")

    monkeypatch.setattr(bcd, "race", never)
    monkeypatch.setattr(bcd, "score_hypotheses", never)
    proposed = []
    real_propose = bcd.propose
    monkeypatch.setattr(bcd, "propose", lambda *a, **kw: proposed.append(real_propose(*a, **kw)) or proposed[-1])
    images, labels = data
    model = tiny_model()
    before = MaskSet(model).flat()
    messages = []
    driver = BCD(model, BCDConfig(targets=[900], drc=60, rt=1, scoring=scoring_rule), images, labels,
                 lambda m, step: {"val_acc": 1.0, "train_images": 500}, tmp_path, log=messages.append)
    with warnings.catch_warnings():  # nothing is chosen, so no warning that the choice is noise
        warnings.simplefilter("error", RuntimeWarning)
        result = driver.run()
    record = result.history[0]
    assert torch.equal((before & ~MaskSet(model).flat()).nonzero().squeeze(1), proposed[0][0])
    assert record["forward_images"] == 64 and record["tries_scored"] == 0  # the reference pass alone
    assert record["fallback"] is False and math.isnan(record["accepted_drop"])
    assert any("one candidate, taken unscored" in m for m in messages)


def test_informed_candidates_are_drawn_from_the_removal_cost_estimate(tmp_path, data, monkeypatch):
    seen = []
    real_costs, real_propose = bcd.removal_costs, bcd.propose

    def spy_costs(*args, **kw):
        seen.append({"costs": real_costs(*args, **kw)})
        return seen[-1]["costs"]

    def spy_propose(costs, *args, **kw):
        seen[-1]["proposed"] = costs
        return real_propose(costs, *args, **kw)

    monkeypatch.setattr(bcd, "removal_costs", spy_costs)
    monkeypatch.setattr(bcd, "propose", spy_propose)
    images, labels = data
    driver = BCD(tiny_model(), BCDConfig(targets=[800], drc=60, rt=2, adt=0.3), images, labels,
                 sgd_finetune(images, labels), tmp_path, log=lambda message: None)
    with pytest.warns(RuntimeWarning):
        driver.run()
    assert len(seen) == 3  # re-estimated before every step, after the previous finetune
    assert all(torch.equal(s["proposed"], s["costs"]) for s in seen)
    assert not torch.equal(seen[0]["costs"], seen[1]["costs"])


def test_a_state_of_another_version_is_one_line_naming_it(tmp_path, data):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    run_driver(tmp_path, data, targets=(860,))
    path = tmp_path / bcd.STATE_FILE
    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata())
    state = json.loads(metadata["bcd_state"])
    save_file(load_file(str(path)), str(path), metadata={**metadata, "bcd_state": json.dumps({**state, "version": 3})})
    with pytest.raises(FastmaskError, match=f"is version 3, .* reads version {bcd.STATE_VERSION}") as caught:
        run_driver(tmp_path, data, targets=(860,), resume=True)
    assert "\n" not in str(caught.value)


def changed(setting: dataclasses.Field, value):
    """Another valid value of a BCD setting."""
    if setting.metadata["choices"]:
        return next(choice for choice in setting.metadata["choices"] if choice != value)
    other = {"network": "lan", "latency_targets": [1.0]}
    if setting.name in other:
        return other[setting.name]
    if isinstance(value, list):
        return [value[0] - 10]
    return value + 1 if isinstance(value, int) else value * 2


@pytest.mark.parametrize("setting", [f for f in dataclasses.fields(BCDConfig)], ids=lambda f: f.name)
def test_every_bcd_setting_identifies_the_run(tmp_path, data, setting):
    """The resume fingerprint is the config section itself: a change to any of its settings is another run."""
    run_driver(tmp_path, data, targets=(860,))
    images, labels = data
    config = BCDConfig(targets=[860], drc=100, rt=3)
    config = dataclasses.replace(config, **{setting.name: changed(setting, getattr(config, setting.name))})
    with pytest.raises(FastmaskError, match="another run"):
        BCD(tiny_model(), config, images, labels, sgd_finetune(images, labels), tmp_path,
            log=lambda m: None).run(resume=True)


def test_reference_is_remeasured_after_every_finetune(tmp_path, data, monkeypatch):
    events = []
    real_score_current = scoring.score_current

    def counting_score_current(model, images, labels, **kwargs):
        events.append(("reference", fm.relu_count(model)))
        return real_score_current(model, images, labels, **kwargs)

    monkeypatch.setattr(bcd, "score_current", counting_score_current)
    images, labels = data
    model, result = run_driver(tmp_path, data, targets=(760,), finetune=sgd_finetune(images, labels, events))
    kinds = [kind for kind, _ in events]
    assert kinds == ["reference", "finetune"] * 2
    # each reference is measured on the model as it stands after the previous step's finetune
    assert [count for kind, count in events if kind == "reference"] == [960, 860]
    assert [r["budget_before"] for r in result.history] == [960, 860]


def test_warns_once_when_adt_is_below_the_scoring_noise(tmp_path, data):
    images, labels = data
    driver = BCD(tiny_model(), BCDConfig(targets=[760], drc=100, rt=2, adt=0.3), images, labels,
                 sgd_finetune(images, labels), tmp_path, log=lambda message: None)
    with pytest.warns(RuntimeWarning, match="standard errors") as caught:
        result = driver.run()
    assert len([w for w in caught if "standard errors" in str(w.message)]) == 1
    assert len(result.warnings) == 1
    assert all(r["ref_se_points"] == pytest.approx(bcd.accuracy_standard_error(r["ref_acc"], 64))
               for r in result.history)


# ---- determinism and resume -------------------------------------------------------------------------------------
def test_same_seed_same_masks_bit_for_bit(tmp_path, data):
    a, _ = run_driver(tmp_path / "a", data, targets=(700,), seed=3)
    b, _ = run_driver(tmp_path / "b", data, targets=(700,), seed=3)
    c, _ = run_driver(tmp_path / "c", data, targets=(700,), seed=4)
    assert torch.equal(MaskSet(a).flat(), MaskSet(b).flat()) and weights_equal(a, b)
    assert not torch.equal(MaskSet(a).flat(), MaskSet(c).flat())


class Killed(Exception):
    pass


@pytest.mark.parametrize("where", ["after_state_written", "during_finetune"])
def test_resume_after_a_kill_gives_the_same_masks_and_weights(tmp_path, data, where):
    images, labels = data
    reference, full = run_driver(tmp_path / "full", data)

    kill_step = 4  # the step that reaches target 700 is 3: the kill lands after a target was saved
    plain = sgd_finetune(images, labels)

    def on_step(record, driver):
        if where == "after_state_written" and record["step"] == kill_step:
            raise Killed()

    def finetune(model, step):
        if where == "during_finetune" and step == kill_step:
            plain(model, step)  # half done: weights changed, then the process dies
            raise Killed()
        return plain(model, step)

    with pytest.raises(Killed):
        run_driver(tmp_path / "killed", data, on_step=on_step, finetune=finetune)
    torch.manual_seed(12345)  # a new process: the global RNG is wherever it is
    resumed, result = run_driver(tmp_path / "killed", data, finetune=plain, resume=True, model=tiny_model(seed=7))
    assert torch.equal(MaskSet(resumed).flat(), MaskSet(reference).flat())
    assert weights_equal(resumed, reference)
    assert [r["budget_after"] for r in result.history] == [r["budget_after"] for r in full.history]
    assert [t["budget"] for t in result.targets] == [700, 455, 300]


def carried_adam_finetune(images, labels, carried):
    """sgd_finetune's steps on an Adam optimizer that `carried` keeps from step to step."""
    config = training.TrainConfig(epochs=1, optimizer="adam", lr=1e-2)

    def finetune(model, step):
        two_steps(model, images, labels, carried.for_model(model, [], config), step)
        return {"val_acc": 50.0, "val_loss": 2.0}
    return finetune


@pytest.mark.parametrize("where", ["after_state_written", "during_finetune"])
def test_resume_restores_the_optimizer_carried_through_the_steps(tmp_path, data, where):
    images, labels = data
    kill_step = 4

    def driver(out, finetune, carried, on_step=None):
        return BCD(tiny_model(), BCDConfig(targets=[700, 455, 300], drc=100, rt=3), images, labels, finetune, out,
                   on_step=on_step, log=lambda message: None, carried=carried)

    carried = training.CarriedOptimizer()
    full = driver(tmp_path / "full", carried_adam_finetune(images, labels, carried), carried)
    with pytest.warns(RuntimeWarning):
        full.run()
    assert {float(v) for k, v in carried.state_tensors().items() if k.endswith(".step")} == {2.0 * full.step}

    carried = training.CarriedOptimizer()
    plain = carried_adam_finetune(images, labels, carried)

    def on_step(record, _driver):
        if where == "after_state_written" and record["step"] == kill_step:
            raise Killed()

    def finetune(model, step):
        plain(model, step)
        if where == "during_finetune" and step == kill_step:
            raise Killed()  # weights and optimizer moved, the state file did not
        return {"val_acc": 50.0, "val_loss": 2.0}

    with pytest.raises(Killed), pytest.warns(RuntimeWarning):
        driver(tmp_path / "killed", finetune, carried, on_step).run()
    with pytest.raises(FastmaskError, match="another run"):  # fresh step finetunes are another run
        driver(tmp_path / "killed", sgd_finetune(images, labels), None).run(resume=True)
    carried = training.CarriedOptimizer()  # a new process
    resumed = driver(tmp_path / "killed", carried_adam_finetune(images, labels, carried), carried)
    resumed.run(resume=True)
    assert torch.equal(MaskSet(resumed.model).flat(), MaskSet(full.model).flat())
    assert weights_equal(resumed.model, full.model)


def test_existing_state_needs_resume_and_the_same_settings(tmp_path, data):
    run_driver(tmp_path, data, targets=(860,))
    images, labels = data
    with pytest.raises(FastmaskError, match="--resume"):
        BCD(tiny_model(), BCDConfig(targets=[860], drc=100, rt=3), images, labels, sgd_finetune(images, labels),
            tmp_path, log=lambda m: None).run()
    with pytest.raises(FastmaskError, match="another run"):
        BCD(tiny_model(), BCDConfig(targets=[860], drc=50, rt=3), images, labels, sgd_finetune(images, labels),
            tmp_path, log=lambda m: None).run(resume=True)


def test_diverged_finetune_restores_the_last_good_state_and_stops(tmp_path, data):
    from fastmask.train import TrainingDiverged

    images, labels = data
    plain = sgd_finetune(images, labels)

    def finetune(model, step):
        if step == 2:
            with torch.no_grad():
                for p in model.parameters():
                    p.fill_(math.nan)
            raise TrainingDiverged("loss is nan")
        return plain(model, step)

    model = tiny_model()
    with pytest.raises(FastmaskError, match="finetune failed"):
        run_driver(tmp_path, data, finetune=finetune, model=model)
    after_step_one = tiny_model()
    bcd.load_state(tmp_path / bcd.STATE_FILE, after_step_one, torch.Generator())
    assert weights_equal(model, after_step_one)
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.cuda
def test_driver_on_cuda_lands_on_the_target(tmp_path, data, monkeypatch):
    monkeypatch.setenv("FASTMASK_TRITON_AUTOTUNE", "0")  # correctness only: autotuning would take minutes
    images, labels = (t.cuda() for t in data)
    model = tiny_model().cuda()
    driver = BCD(model, BCDConfig(targets=[700], drc=100, rt=4, adt=0.3), images, labels,
                 sgd_finetune(images, labels), tmp_path, log=lambda message: None)
    with pytest.warns(RuntimeWarning):
        result = driver.run()
    assert MaskSet(model).count() == 700 and [t["budget"] for t in result.targets] == [700]


# ---- --cost latency and latency targets (fastmask.search.pricing) --------------------------------------------------
def few_in_last_site(model, kept_last: int = 5):
    """Every site full but the last, which keeps `kept_last` ReLUs: a site worth emptying on a slow network."""
    last = MaskSet(model).sites[-1]
    flat = torch.zeros(last.mask.numel(), dtype=torch.bool)
    flat[:kept_last] = True
    last.mask.copy_(flat.view(last.mask.shape))
    return model


@pytest.mark.parametrize("proposal", ["informed", "uniform"])
def test_latency_cost_empties_the_small_site_that_counting_relus_leaves(tmp_path, data, proposal):
    images, labels = data
    counts = {}
    for cost_name in ("relus", "latency"):
        model = few_in_last_site(tiny_model())
        start = MaskSet(model).count()
        config = BCDConfig(targets=[start - 100], drc=100, rt=2, adt=100.0, cost=cost_name, proposal=proposal)
        BCD(model, config, images, labels, sgd_finetune(images, labels), tmp_path / cost_name,
            log=lambda m: None).run()
        counts[cost_name] = [site.relu_count() for site in MaskSet(model).sites]
    assert counts["relus"][-1] > 0  # 5 of 955 present ReLUs: candidates of 100 rarely take all five
    assert counts["latency"][-1] == 0  # emptying the site saves its rounds: within ADT, the largest saving wins
    assert sum(counts["latency"]) == sum(counts["relus"])  # both land on the budget


def test_latency_targets_are_saved_when_the_prediction_falls_to_them(tmp_path, data):
    from fastmask.search.pricing import LatencyPricing, kept_per_site

    images, labels = data
    model = few_in_last_site(tiny_model(), kept_last=40)
    pricing = LatencyPricing.of(model, "crypten-public", "wan")
    start = pricing.current(MaskSet(model))
    per_relu, per_site = pricing.per_relu_and_site()
    goals = [start - 0.5 * per_site, start - 1.5 * per_site]  # one emptied site, then two
    config = BCDConfig(latency_targets=goals, drc=100, rt=2, adt=100.0, cost="latency")
    calls = []
    driver = BCD(model, config, images, labels, sgd_finetune(images, labels), tmp_path, log=lambda m: None,
                 target_finetune=lambda m, step: calls.append(step) or {"val_acc": 1.0, "train_images": 0})
    result = driver.run()
    assert [t["latency_target"] for t in result.targets] == goals
    for entry in result.targets:
        assert entry["latency_seconds"] <= entry["latency_target"]
        assert (tmp_path / "targets" / str(entry["budget"]) / "model.safetensors").is_file()
    assert pricing.current(MaskSet(model)) <= goals[-1]
    assert sum(1 for k in kept_per_site(MaskSet(model)) if k == 0) >= 2
    assert all("latency_seconds" in row and "sites" in row for row in result.history)
    assert len(calls) == len({t["step"] for t in result.targets})  # one target finetune per landing step


@pytest.mark.parametrize("goal, message", [(100.0, "at or above the predicted latency BCD starts from"),
                                           (1e-6, "below what the model costs with no ReLU at all")])
def test_latency_targets_out_of_reach_are_one_line(tmp_path, data, goal, message):
    images, labels = data
    config = BCDConfig(latency_targets=[goal], drc=100, rt=2, cost="latency")
    with pytest.raises(FastmaskError, match=message) as caught:
        BCD(tiny_model(), config, images, labels, sgd_finetune(images, labels), tmp_path, log=lambda m: None).run()
    assert "\n" not in str(caught.value)
    assert not (tmp_path / bcd.STATE_FILE).exists()


def test_choose_by_saving():
    from fastmask.search.pricing import choose_by_saving

    assert choose_by_saving([0.1, 0.2, 0.5], [1.0, 3.0, 9.0], adt=0.3) == (1, False)  # within ADT: most saved
    assert choose_by_saving([0.6, 2.0, math.nan], [1.0, 10.0, 50.0], adt=0.3) == (1, True)  # least drop per second
    assert choose_by_saving([-0.1, 0.0], [2.0, 2.0], adt=0.3) == (0, False)  # ties: the earlier


@pytest.mark.parametrize("polynomial", [False, True])
def test_pricing_matches_the_cost_model_of_the_model_after_a_removal(polynomial):
    """What the search weighs a candidate by is the cost model's latency of the model before minus after it: the
    ReLUs, an emptied site's rounds, and (polynomial) the secret products the removed positions take on."""
    import copy

    from fastmask import cost
    from fastmask.search.pricing import LatencyPricing

    torch.manual_seed(0)
    model = fm.models.create("resnet18", 10, 8, width=2, in_channels=1, polynomial=polynomial)
    for _, site in fm.masked_sites(model):
        if site.coeffs is not None:
            site.coeffs.data = torch.randn(site.coeffs.shape)
            site.coeffs.data[::2, 2] = 0.0  # half the channels linear: their removed positions cost no product
    masks = MaskSet(model)
    last = masks.offsets[-2]  # the whole last site, and 30 ReLUs elsewhere
    candidate = torch.cat([torch.arange(last, masks.total()), masks.present()[:30]]).unique()
    protocol, network = cost.get_protocol("crypten-public"), cost.NETWORKS["wan"]
    pricing = LatencyPricing.of(model, "crypten-public", "wan")
    before = cost.latency(cost.workload(model), protocol, network)
    after_model = copy.deepcopy(model)
    MaskSet(after_model).remove(candidate)
    after = cost.latency(cost.workload(after_model), protocol, network)
    assert pricing.current(masks) == pytest.approx(before)
    assert pricing.saving(candidate, masks) == pytest.approx(before - after)
    assert cost.workload(after_model).sites == cost.workload(model).sites - 1
