"""race (successive halving): the image-forwards it spends, that it keeps a clearly best candidate, that identical
candidates reproduce exact scoring, acceptance against a reference, slices, ranking and determinism."""
import math

import pytest
import torch
import torch.nn as nn
from helpers import randomize_batchnorm

import fastmask as fm
from fastmask.errors import FastmaskError
from fastmask.search import racing
from fastmask.search.racing import default_first_slice, race
from fastmask.search.scoring import score_current, score_hypotheses

IMAGE = 8
CLASSES = 10


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads cost more than they give


def make_model(seed: int = 0) -> nn.Module:
    """A tiny ResNet18, BN away from identity, 30% of ReLUs removed."""
    torch.manual_seed(seed)
    model = fm.models.create("resnet18", CLASSES, IMAGE, width=4)
    randomize_batchnorm(model, seed)
    ms = fm.MaskSet(model)
    ms.remove(ms.sample(int(ms.total() * 0.3), torch.Generator().manual_seed(seed)))
    return model


def make_data(model: nn.Module, n: int = 64, seed: int = 0):
    """Random images labelled by the model itself, after centring and scaling the head on them (logits of std 3),
    so labels vary by image and removing many ReLUs clearly hurts."""
    images = torch.randn(n, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(seed))
    model.eval()
    with torch.no_grad():
        x = model.stem(images)
        for block in model.blocks:
            x = block(x)
        features = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        weight = model.linear.weight
        weight.mul_(3.0 / ((features - features.mean(dim=0)) @ weight.T).std().clamp(min=1e-6))
        model.linear.bias.copy_(-(features.mean(dim=0) @ weight.T))
        labels = model(images).argmax(dim=1)
    model.train()
    return images, labels


def candidates_for(model, count: int, size: int, seed: int = 1) -> list[torch.Tensor]:
    ms = fm.MaskSet(model)
    g = torch.Generator().manual_seed(seed)
    return [ms.sample(size, g) for _ in range(count)]


class Recorder:
    """Wraps score_hypotheses as racing calls it: records (candidates, images) of every call."""

    def __init__(self, monkeypatch):
        self.calls = []
        original = racing.score_hypotheses

        def recording(model, candidates, images, labels, **kwargs):
            self.calls.append((len(candidates), images.clone(), labels.clone()))
            return original(model, candidates, images, labels, **kwargs)

        monkeypatch.setattr(racing, "score_hypotheses", recording)


def test_forward_images_is_far_below_exact_scoring(monkeypatch):
    model = make_model()
    images, labels = make_data(model, 64)
    candidates = candidates_for(model, 16, 100)
    recorder = Recorder(monkeypatch)
    result = race(model, candidates, images, labels, first_slice=4)
    spent = sum(k * x.shape[0] for k, x, _ in recorder.calls)
    assert result.forward_images == spent == 16 * 4 + 8 * 8 + 4 * 16 + 2 * 32 + 1 * 64
    assert result.forward_images < 0.35 * len(candidates) * images.shape[0]
    assert [r["images"] for r in result.rounds] == [4, 8, 16, 32, 64]
    assert [r["candidates"] for r in result.rounds] == [16, 8, 4, 2, 1]
    assert sorted(result.order) == list(range(16)) and result.order[:1] == result.survivors
    assert result.best == result.survivors[0]


def test_clearly_best_candidate_survives():
    """Among candidates removing 60% of the present ReLUs, one removing none wins by both criteria."""
    model = make_model()
    images, labels = make_data(model, 64)
    ms = fm.MaskSet(model)
    harmful = candidates_for(model, 15, int(0.6 * ms.count()))
    for position in (0, 6, 15):
        candidates = harmful[:position] + [torch.empty(0, dtype=torch.int64)] + harmful[position:]
        for criterion in ("accuracy", "loss"):
            result = race(model, candidates, images, labels, criterion=criterion, first_slice=4)
            assert result.best == position and result.order[0] == position
            assert result.best_scores == score_current(model, images, labels)


def test_identical_candidates_give_exact_scoring():
    model = make_model()
    images, labels = make_data(model, 48)
    candidate = candidates_for(model, 1, 150)[0]
    exact = score_hypotheses(model, [candidate], images, labels)
    result = race(model, [candidate.clone() for _ in range(8)], images, labels, first_slice=6)
    assert result.best == 0 and result.survivors[0] == 0  # ties go to the lower index
    assert result.accuracy[0] == float(exact.accuracy[0])
    assert math.isclose(result.loss[0], float(exact.loss[0]), rel_tol=1e-6, abs_tol=1e-7)
    assert len(set(result.accuracy)) == 1


def test_deterministic_and_leaves_the_model_alone():
    model = make_model()
    images, labels = make_data(model, 64)
    candidates = candidates_for(model, 12, 80)
    masks = fm.MaskSet(model).flat()
    first = race(model, candidates, images, labels, first_slice=8)
    again = race(model, candidates, images, labels, first_slice=8)
    assert first == again
    assert model.training and torch.equal(fm.MaskSet(model).flat(), masks)
    assert all(site.hypotheses is None for site in fm.MaskSet(model).sites)


def test_slices_are_prefixes_of_a_fixed_shuffle(monkeypatch):
    model = make_model()
    images, labels = make_data(model, 40)
    candidates = candidates_for(model, 6, 50)
    recorder = Recorder(monkeypatch)
    race(model, candidates, images, labels, first_slice=5, shuffle_seed=None)
    assert [x.shape[0] for _, x, _ in recorder.calls] == [5, 10, 20, 40]  # 6 -> 3 -> 2 -> 1 candidates
    for _, x, y in recorder.calls:
        assert torch.equal(x, images[:x.shape[0]]) and torch.equal(y, labels[:x.shape[0]])
    recorder.calls.clear()
    race(model, candidates, images, labels, first_slice=5, shuffle_seed=3)
    order = torch.randperm(40, generator=torch.Generator().manual_seed(3))
    for _, x, y in recorder.calls[:-1]:
        assert torch.equal(x, images[order[:x.shape[0]]]) and torch.equal(y, labels[order[:x.shape[0]]])
    assert torch.equal(recorder.calls[-1][1], images)  # the final round scores the subset as given


def test_acceptance_against_the_reference():
    model = make_model()
    images, labels = make_data(model, 64)
    candidates = candidates_for(model, 8, 200)
    reference = score_current(model, images, labels)
    lenient = race(model, candidates, images, labels, reference=reference, adt=100.0, first_slice=8)
    assert lenient.accepted == lenient.best
    strict = race(model, candidates, images, labels, reference=reference, adt=0.0, first_slice=8)
    accuracy, _ = strict.best_scores
    assert strict.best == lenient.best
    assert (strict.accepted is None) == (reference[0] - accuracy >= 0.0)
    by_loss = race(model, candidates, images, labels, criterion="loss", reference=reference, adt=-1.0,
                   first_slice=8)
    assert by_loss.accepted is None and by_loss.loss == sorted(by_loss.loss)
    with pytest.raises(FastmaskError):
        race(model, candidates, images, labels, reference=reference)


def test_final_pick_follows_the_criterion():
    model = make_model()
    images, labels = make_data(model, 32)
    candidates = candidates_for(model, 10, 300)
    exact = score_hypotheses(model, candidates, images, labels)
    # first_slice = the whole subset: one exact round, so the pick is the exact best by each criterion
    by_accuracy = race(model, candidates, images, labels, first_slice=32)
    by_loss = race(model, candidates, images, labels, criterion="loss", first_slice=32)
    assert by_accuracy.forward_images == 10 * 32 and len(by_accuracy.survivors) == 10
    best_accuracy = max(range(10), key=lambda i: (float(exact.accuracy[i]), -float(exact.loss[i]), -i))
    assert by_accuracy.best == best_accuracy
    assert by_loss.best == int(torch.argmin(exact.loss))


def test_default_first_slice():
    assert default_first_slice(50, 50000, 2) == math.ceil(50000 / 32)
    assert default_first_slice(50, 1000, 2) == 256
    assert default_first_slice(50, 100, 2) == 100
    assert default_first_slice(1, 50000, 2) == 50000
    assert default_first_slice(9, 9000, 3) == 3000
    model = make_model()
    images, labels = make_data(model, 16)
    single = race(model, candidates_for(model, 1, 10), images, labels, first_slice=2)
    assert single.forward_images == 16 and single.best == 0


def test_bad_arguments():
    model = make_model()
    images, labels = make_data(model, 16)
    candidates = candidates_for(model, 3, 10)
    for kwargs in ({"criterion": "f1"}, {"eta": 1}, {"first_slice": 0}):
        with pytest.raises(FastmaskError):
            race(model, candidates, images, labels, **kwargs)
    with pytest.raises(FastmaskError):
        race(model, [], images, labels)
    with pytest.raises(FastmaskError):
        race(model, candidates, images, labels[:5])
