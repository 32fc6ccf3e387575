"""train / evaluate (fastmask/train.py) on a tiny ResNet18 (width 4) and the offline digits data."""
import copy
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

import fastmask as fm
from fastmask import FastmaskError, data
from fastmask import train as training


@pytest.fixture(scope="module")
def digits():
    return data.load_dataset("digits")


@pytest.fixture(scope="module")
def small(digits):
    """256 train images: two batches of 128 per epoch keep each test to a second or two."""
    return dataclasses.replace(digits, train_x=digits.train_x[:256], train_y=digits.train_y[:256])


def tiny_model(dataset, seed=0):
    torch.manual_seed(seed)
    return fm.models.create("resnet18", dataset.num_classes, dataset.image_size, width=4,
                            in_channels=dataset.in_channels)


def same_weights(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_training_reduces_loss(digits):
    model = tiny_model(digits)
    before_acc, before_loss = training.evaluate(model, digits.val_x, digits.val_y, digits, "cpu")
    config = training.TrainConfig(epochs=2, optimizer="sgd", lr=0.05, batch_size=64)
    history = training.train(model, digits, config, "cpu", progress=False)
    after_acc, after_loss = training.evaluate(model, digits.val_x, digits.val_y, digits, "cpu")
    assert len(history) == 2 and set(history[0]) >= {"epoch", "train_loss", "train_acc", "val_acc", "val_loss",
                                                    "seconds"}
    assert after_loss < before_loss - 0.3 and after_acc > before_acc + 20
    assert history[-1]["val_acc"] == pytest.approx(after_acc)
    assert history[1]["train_loss"] < history[0]["train_loss"]


def test_same_seed_bit_identical(small):
    base = tiny_model(small)
    runs = []
    for seed in (0, 0, 1):
        model = copy.deepcopy(base)
        config = training.TrainConfig(epochs=2, optimizer="sgd", lr=0.05, seed=seed)
        training.train(model, small, config, "cpu", progress=False)
        runs.append(model)
    assert same_weights(runs[0], runs[1])
    assert not same_weights(runs[0], runs[2])  # the seed drives shuffling and augmentation


def test_nan_loss_restores_epoch_start_and_raises(small):
    model = tiny_model(small)
    saved = {}
    steps = {"n": 0}

    def poison_in_second_epoch(_model):
        steps["n"] += 1
        return torch.tensor(float("nan") if steps["n"] == 3 else 0.0)

    def remember(epoch, row, trained):
        saved.update({k: v.clone() for k, v in trained.state_dict().items()})

    config = training.TrainConfig(epochs=3, optimizer="sgd", lr=0.05)
    with pytest.raises(training.TrainingDiverged, match="restored"):
        training.train(model, small, config, "cpu", loss_hook=poison_in_second_epoch, on_epoch=remember,
                       progress=False)
    assert issubclass(training.TrainingDiverged, FastmaskError)
    # epoch 1 ran 2 steps; step 3 (epoch 2) diverged: the model is back at the end of epoch 1
    assert steps["n"] == 3
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_kd_path(small):
    teacher = tiny_model(small, seed=1)
    student, plain = tiny_model(small), tiny_model(small)
    config = training.TrainConfig(epochs=1, optimizer="sgd", lr=0.05, kd_weight=0.5)
    with_kd = training.train(student, small, config, "cpu", teacher=teacher, progress=False)
    without = training.train(plain, small, config, "cpu", progress=False)
    assert math.isfinite(with_kd[0]["train_loss"]) and with_kd[0]["train_loss"] != without[0]["train_loss"]
    assert not same_weights(student, plain)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_distillation_loss_matches_definition(temperature):
    torch.manual_seed(0)
    student, teacher = torch.randn(5, 7), torch.randn(5, 7)
    p_teacher = F.softmax(teacher / temperature, dim=1)
    expected = (p_teacher * (p_teacher.log() - F.log_softmax(student / temperature, dim=1))).sum(1).mean()
    got = training.distillation_loss(student, teacher, temperature)
    torch.testing.assert_close(got, expected * temperature ** 2)
    assert float(training.distillation_loss(teacher, teacher, temperature)) == pytest.approx(0.0, abs=1e-6)


def test_max_steps_honored_and_cosine_reaches_zero(small):
    model = tiny_model(small)
    calls = {"n": 0}

    def count(_model):
        calls["n"] += 1
        return torch.zeros(())

    config = training.TrainConfig(epochs=5, optimizer="sgd", lr=0.05)
    history = training.train(model, small, config, "cpu", loss_hook=count, max_steps=3, progress=False)
    assert calls["n"] == 3 and history[-1]["steps"] == 3 and len(history) == 2
    assert history[-1]["lr"] == pytest.approx(0.0)  # the schedule spans the steps actually run
    assert training.optimizer_steps(len(small.train_y), config, 3) == 3
    two_epochs = dataclasses.replace(config, epochs=2)  # 2 x 2 batches: fewer than max_steps 10,000, more than 3
    history = training.train(tiny_model(small), small, two_epochs, "cpu", progress=False)
    assert history[-1]["steps"] == training.optimizer_steps(len(small.train_y), two_epochs) == 4
    assert training.optimizer_steps(len(small.train_y), two_epochs, 10_000) == 4


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_carried_optimizer_goes_on_across_calls_and_through_its_state_tensors(small, optimizer):
    config = training.TrainConfig(epochs=1, optimizer=optimizer, lr=0.01, lr_schedule="constant")
    start = tiny_model(small)

    def two_calls(model, carried, between=None):
        training.train(model, small, dataclasses.replace(config, seed=1), "cpu", max_steps=2, progress=False,
                       carried=carried)
        if between is not None:
            model, carried = between(model, carried)
        training.train(model, small, dataclasses.replace(config, seed=2), "cpu", max_steps=2, progress=False,
                       carried=carried)
        return model, carried

    carried_model, carried = two_calls(copy.deepcopy(start), training.CarriedOptimizer())
    state = carried.state_tensors()
    if optimizer == "adam":  # one run of four steps, not two runs of two
        assert {float(v) for k, v in state.items() if k.endswith(".step")} == {4.0}
    else:
        assert any(k.endswith(".momentum_buffer") for k in state)

    def reload(model, old):  # a new process: a copy of the model and the optimizer from its tensors alone
        fresh = training.CarriedOptimizer()
        fresh.load_state_tensors(old.state_tensors())
        return copy.deepcopy(model), fresh

    resumed, _ = two_calls(copy.deepcopy(start), training.CarriedOptimizer(), between=reload)
    assert same_weights(resumed, carried_model)
    restarted, _ = two_calls(copy.deepcopy(start), None)  # a new optimizer per call: another run
    assert not same_weights(restarted, carried_model)
    with pytest.raises(RuntimeError, match="another model"):
        carried.for_model(tiny_model(small), [], config)


def test_on_epoch_stop(small):
    model = tiny_model(small)
    config = training.TrainConfig(epochs=4, optimizer="adam", lr=1e-3)
    history = training.train(model, small, config, "cpu", on_epoch=lambda e, row, m: "stop" if e == 2 else None,
                             progress=False)
    assert [row["epoch"] for row in history] == [1, 2]


def test_lr_schedules():
    cosine = training.TrainConfig(epochs=1, optimizer="sgd", lr=0.1)
    assert training._lr_at(0, 10, cosine) == pytest.approx(0.1)
    assert training._lr_at(5, 10, cosine) == pytest.approx(0.05)
    assert training._lr_at(10, 10, cosine) == pytest.approx(0.0)
    constant = training.TrainConfig(epochs=1, optimizer="adam", lr=1e-3, lr_schedule="constant")
    assert training._lr_at(7, 10, constant) == 1e-3


def test_extra_params_are_trained_without_weight_decay(small):
    model = tiny_model(small)
    extra = torch.nn.Parameter(torch.ones(3))
    config = training.TrainConfig(epochs=1, optimizer="sgd", lr=0.1, weight_decay=0.5)
    # its gradient is zero, so only weight decay could move it
    training.train(model, small, config, "cpu", extra_params=[extra], loss_hook=lambda m: (extra * 0).sum(),
                   progress=False)
    assert torch.equal(extra.detach(), torch.ones(3))


def test_correct_per_image_is_what_evaluate_counts(digits):
    model = tiny_model(digits)
    model.train()
    right = training.correct_per_image(model, digits.val_x, digits.val_y, digits, "cpu", batch_size=37)
    assert model.training  # its flag restored
    with torch.no_grad():
        logits = model.eval()(data.normalize(digits.val_x, digits, "cpu"))
    assert right.dtype == torch.bool and torch.equal(right, logits.argmax(1) == digits.val_y)
    accuracy, _ = training.evaluate(model, digits.val_x, digits.val_y, digits, "cpu")
    assert 100.0 * right.float().mean().item() == pytest.approx(accuracy)
    assert 0 < int(right.sum()) < len(right)  # both outcomes occur, so the comparison means something


def test_evaluate_matches_evaluate_tensors(digits):
    model = tiny_model(digits)
    images = data.normalize(digits.val_x, digits, "cpu")
    by_split = training.evaluate(model, digits.val_x, digits.val_y, digits, "cpu", batch_size=50)
    by_tensor = training.evaluate_tensors(model, images, digits.val_y, batch_size=1000)
    assert by_split[0] == pytest.approx(by_tensor[0]) and by_split[1] == pytest.approx(by_tensor[1], rel=1e-5)
    with torch.no_grad():
        logits = model.eval()(images)
    assert by_tensor[0] == pytest.approx(100.0 * (logits.argmax(1) == digits.val_y).float().mean().item())
    assert by_tensor[1] == pytest.approx(F.cross_entropy(logits, digits.val_y).item(), rel=1e-5)
    model.train()
    training.evaluate_tensors(model, images[:10], digits.val_y[:10])
    assert model.training  # the caller's mode is kept
    assert all(math.isnan(v) for v in training.evaluate_tensors(model, images[:0], digits.val_y[:0]))


def test_configs():
    base = training.baseline_config(30)
    assert (base.optimizer, base.lr, base.momentum, base.weight_decay, base.augment) == ("sgd", 0.1, 0.9, 5e-4, True)
    resnet = training.finetune_config("resnet18", 20)
    assert (resnet.optimizer, resnet.lr, resnet.epochs) == ("sgd", 1e-3, 20)
    wide = training.finetune_config("wide_resnet22_8", 5)
    assert (wide.optimizer, wide.lr, wide.weight_decay) == ("adam", 3.5e-5, 0.0)
    assert training.finetune_config("resnet18", 3, optimizer="adam").lr == 3.5e-5
    assert training.finetune_config("resnet18", 3, lr=0.01).lr == 0.01
    with pytest.raises(FastmaskError, match="unknown optimizer"):
        training.TrainConfig(epochs=1, optimizer="rmsprop", lr=0.1)
    with pytest.raises(FastmaskError, match="epochs"):
        training.TrainConfig(epochs=0, optimizer="sgd", lr=0.1)


@pytest.mark.cuda
def test_cuda_amp_channels_last_training(digits):
    model, teacher = tiny_model(digits), tiny_model(digits, seed=1)
    before = training.evaluate(model, digits.val_x, digits.val_y, digits, "cuda")
    config = training.TrainConfig(epochs=2, optimizer="sgd", lr=0.05, batch_size=64)  # amp, channels_last: on
    history = training.train(model, digits, config, "cuda", teacher=teacher, progress=False)
    conv = model.layer1[0].conv1.weight
    assert conv.is_cuda and conv.is_contiguous(memory_format=torch.channels_last)
    after = training.evaluate(model, digits.val_x, digits.val_y, digits, "cuda")
    assert math.isfinite(history[-1]["train_loss"]) and after[1] < before[1]
    images = data.normalize(digits.val_x, digits, "cuda")
    by_tensor = training.evaluate_tensors(model, images, digits.val_y.cuda())
    assert by_tensor[0] == pytest.approx(after[0])
