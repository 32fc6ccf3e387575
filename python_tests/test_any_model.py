"""Any ReLU network through the pipeline: --arch torchvision:<name> or file.py:function, the user's state_dict as
--checkpoint, folder datasets, and every bad input as one line, exit 2, nothing written."""
from __future__ import annotations

import shutil
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import randomized

import fastmask as fm
from fastmask import cli
from fastmask.checkpoint import load_any, load_model, read_state_dict
from fastmask.errors import FastmaskError
from fastmask.models import external

BUILDER = textwrap.dedent('''
    import torch
    import torch.nn as nn
    import torch.nn.functional as F


    class Small(nn.Module):
        def __init__(self, num_classes=3):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
            self.bn1 = nn.BatchNorm2d(4)
            self.act = nn.ReLU()
            self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(4)
            self.six = nn.ReLU6()
            self.fc = nn.Linear(4, num_classes)

        def forward(self, x):
            x = self.act(self.bn1(self.conv1(x)))
            x = F.relu(self.bn2(self.conv2(x)) + x)
            x = self.six(x)
            return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


    def build(num_classes=3):
        return Small(num_classes)


    def no_relu():
        return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 3))


    def broken():
        raise RuntimeError("no GPU in this builder")


    def fixed_head():
        return Small(5)


    def relu_only(num_classes=3):
        model = Small(num_classes)
        model.six = nn.Identity()
        return model
''')

TINY = ["--baseline-epochs", "1", "--targets", "300,250", "--drc", "25", "--rt", "2", "--finetune-epochs", "1",
        "--score-subset", "32", "--adt", "50", "--finetune-target-epochs", "1", "--device", "cpu", "--quiet"]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    pass


@pytest.fixture
def builder(tmp_path) -> Path:
    path = tmp_path / "my_model.py"
    path.write_text(BUILDER)
    return path


@pytest.fixture
def npz(tmp_path) -> Path:
    """3 classes of 8x8 RGB images whose class is their mean brightness: learnable in a step or two."""
    generator = np.random.default_rng(0)

    def split(n):
        labels = np.arange(n) % 3
        images = generator.integers(0, 60, size=(n, 8, 8, 3)) + 80 * labels[:, None, None, None]
        return images.astype(np.uint8), labels.astype(np.int64)

    x_train, y_train = split(96)
    x_test, y_test = split(24)
    path = tmp_path / "toy.npz"
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return path


def plain_weights(builder: Path, tmp_path: Path, suffix: str = ".pt") -> Path:
    """A state_dict as plain PyTorch saves it."""
    model = external.build_plain(f"{builder}:build", 3)
    path = tmp_path / f"weights{suffix}"
    if suffix == ".pt":
        torch.save(model.state_dict(), path)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


# ---- models --------------------------------------------------------------------------------------------------------
def test_user_builder_is_converted_with_its_spec_and_other_activations_counted(builder):
    model = external.build(f"{builder}:build", 3, 8)
    assert isinstance(model, external.ConvertedModel)
    assert model.fastmask_spec["arch"] == f"{builder.resolve()}:build"
    assert len(fm.masked_sites(model)) == 2 and fm.relu_count(model) == 2 * 4 * 8 * 8
    assert external.other_activations(model) == {"ReLU6": 1}


def test_torchvision_builder_by_name_takes_the_data_class_count():
    model = external.build("torchvision:resnet18", 7, 16).eval()
    assert model(torch.zeros(1, 3, 16, 16)).shape == (1, 7)
    assert len(fm.masked_sites(model)) == 17


def test_checkpoint_of_a_converted_model_rebuilds_it(builder, tmp_path):
    torch.manual_seed(0)
    model = external.build(f"{builder}:build", 3, 8).eval()
    fm.MaskSet(model).remove(torch.arange(0, 50))
    path = tmp_path / "m.safetensors"
    from fastmask.checkpoint import save_model

    save_model(model, path)
    loaded = load_model(path).eval()
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(loaded(x), model(x))
    assert fm.relu_count(loaded) == fm.relu_count(model) == 2 * 4 * 64 - 50


def test_a_builder_gone_at_load_time_is_one_error_naming_it(builder, tmp_path):
    from fastmask.checkpoint import save_model

    path = tmp_path / "m.safetensors"
    save_model(external.build(f"{builder}:build", 3, 8), path)
    builder.rename(tmp_path / "moved.py")
    with pytest.raises(FastmaskError, match="my_model.py"):
        load_model(path)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_user_state_dict_is_loaded_before_conversion(builder, tmp_path, suffix):
    path = plain_weights(builder, tmp_path, suffix)
    reference = external.build_plain(f"{builder}:build", 3)
    reference.load_state_dict(read_state_dict(path))
    model = load_any(path, f"{builder}:build", 3, 8).eval()
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(model(x), reference.eval()(x))


def test_plain_weights_of_a_built_in_arch_load_without_masks(tmp_path):
    torch.manual_seed(0)
    model = fm.models.create("resnet18", 3, 8, width=4).eval()
    path = tmp_path / "plain.pth"
    torch.save({"state_dict": {k: v for k, v in model.state_dict().items() if not k.endswith(".mask")}}, path)
    loaded = load_any(path, "resnet18", 3, 8).eval()
    assert loaded.fastmask_spec["width"] == 4 and fm.relu_count(loaded) == fm.MaskSet(loaded).total()
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(loaded(x), model(x))


def test_a_pickled_module_is_refused_without_unpickling(builder, tmp_path):
    path = tmp_path / "whole.pt"
    torch.save(external.build_plain(f"{builder}:build", 3), path)
    with pytest.raises(FastmaskError, match=r"state_dict\(\)"):
        read_state_dict(path)


# ---- the command ---------------------------------------------------------------------------------------------------
def test_builder_and_plain_weights_run_the_pipeline_without_a_baseline(builder, npz, tmp_path, capsys):
    weights = plain_weights(builder, tmp_path)
    out = tmp_path / "run"
    code = cli.main(["--dataset", f"npz:{npz}", "--arch", f"{builder}:build", "--checkpoint", str(weights),
                     "--teacher", str(weights), "--out", str(out)] + TINY)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "ReLU6" in captured.out and "baseline: training" not in captured.out
    assert not (out / "baseline").exists()
    for budget in (300, 250):
        model = load_model(out / "targets" / str(budget) / "model.safetensors")
        assert fm.relu_count(model) == budget


def test_torchvision_arch_trains_a_baseline_and_resumes_identically(npz, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--dataset", f"npz:{npz}", "--arch", "torchvision:resnet18", "--ref-budget", "1000", "--snl-epochs", "1",
            "--snl-finetune-epochs", "0", "--out", str(out)] + TINY
    argv[argv.index("300,250")] = "900,800"
    assert cli.main(argv) == 0, capsys.readouterr().err
    masks = {b: fm.MaskSet(load_model(out / "targets" / str(b) / "model.safetensors")).snapshot() for b in (900, 800)}
    # the run from its SNL model on: the same settings with --resume make the same masks
    for folder in ("targets", "checkpoints"):
        shutil.rmtree(out / folder, ignore_errors=True)
    for name in ("steps.csv", "summary.json"):
        (out / name).unlink(missing_ok=True)
    assert cli.main(argv + ["--resume"]) == 0, capsys.readouterr().err
    for budget, before in masks.items():
        after = fm.MaskSet(load_model(out / "targets" / str(budget) / "model.safetensors")).snapshot()
        assert all(torch.equal(a, b) for a, b in zip(after, before))


def _bad_inputs(builder: Path, npz: Path, tmp_path: Path) -> list[tuple[list[str], str]]:
    weights = plain_weights(builder, tmp_path)
    pickled = tmp_path / "pickled.pt"
    torch.save(external.build_plain(f"{builder}:build", 3), pickled)
    other = tmp_path / "other.pt"
    torch.save({"conv1.weight": torch.zeros(4, 3, 3, 3), "extra.weight": torch.zeros(1)}, other)
    empty = tmp_path / "empty"
    (empty / "cat").mkdir(parents=True)
    (empty / "dog").mkdir()
    one = tmp_path / "one"
    (one / "cat").mkdir(parents=True)
    from PIL import Image

    Image.new("RGB", (10, 10)).save(one / "cat" / "a.png")
    unreadable = tmp_path / "unreadable"
    for name in ("cat", "dog"):
        (unreadable / name).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (10, 10), (i * 40, 0, 0)).save(unreadable / name / f"{i}.png")
    good = tmp_path / "good"
    shutil.copytree(unreadable, good)
    (unreadable / "dog" / "broken.png").write_bytes(b"not a png at all")
    data = ["--dataset", f"npz:{npz}"]
    arch = f"{builder}:build"
    return [
        (data + ["--arch", f"{builder}:no_relu"], "no ReLU"),
        (data + ["--arch", f"{builder}:broken"], "builder raised RuntimeError"),
        (data + ["--arch", f"{builder}:nothing_here"], "has no function 'nothing_here'"),
        (data + ["--arch", str(tmp_path / "absent.py") + ":build"], "does not exist"),
        (data + ["--arch", "torchvision:resnet4000"], "torchvision has no model"),
        (data + ["--arch", arch, "--checkpoint", str(pickled)], "torch.save(model.state_dict(), path)"),
        (data + ["--arch", arch, "--checkpoint", str(other)], "missing"),
        (data + ["--arch", f"{builder}:fixed_head"], "outputs 5 classes but the data has 3"),
        (["--dataset", f"folder:{empty}", "--arch", arch], "has no images"),
        (["--dataset", f"folder:{one}", "--arch", arch], "has one class"),
        (["--dataset", f"folder:{unreadable}", "--arch", arch], "cannot read image"),
        (["--dataset", f"folder:{good}", "--image-size", "4", "--arch", "torchvision:vgg11_bn"],
         "cannot take 3x4x4 images"),
        (["--dataset", f"folder:{good}", "--image-size", "200000", "--arch", arch], "GiB of memory"),
        (data + ["--checkpoint", str(weights)], "name its model with --arch"),
        (data + ["--arch", arch, "--width", "8"], "has its own"),
    ]


def test_bad_inputs_are_one_line_exit_2_and_write_nothing(builder, npz, tmp_path, capsys):
    cases = _bad_inputs(builder, npz, tmp_path)
    assert len(cases) >= 10
    for index, (argv, expected) in enumerate(cases):
        out = tmp_path / f"out{index}"
        code = cli.main(argv + ["--targets", "100", "--out", str(out), "--quiet", "--device", "cpu"])
        err = capsys.readouterr().err.strip()
        assert code == 2, (argv, err)
        assert len(err.splitlines()) == 1 and err.startswith("fastmask-linearize: error: "), err
        assert expected in err, (expected, err)
        assert not out.exists()


# ---- export --------------------------------------------------------------------------------------------------------
class _Pools(nn.Module):
    """Every lowering kind: folded and unfolded BN, functional pools, an adaptive pool that upsamples and one that
    does not divide, concat, a method flatten and a view."""

    def __init__(self, num_classes=3):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.bn_free = nn.BatchNorm2d(8)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2, bias=False)
        self.up = nn.AdaptiveAvgPool2d((3, 3))
        self.odd = nn.AdaptiveAvgPool2d((3, 3))
        self.fc = nn.Linear(8 * 9 + 8 * 9, num_classes)

    def forward(self, x):
        a = torch.relu(self.bn(self.conv(x)))
        b = torch.cat([a, F.avg_pool2d(F.max_pool2d(a, 3, 1, 1), 3, 1, 1)], 1)
        b = self.bn_free(b).relu()
        c = F.relu(self.grouped(b)) + b
        small = self.up(F.max_pool2d(c, 4))  # 2x2 -> 3x3
        odd = self.odd(F.avg_pool2d(c, 2, 2, 0, True))  # 4x4 -> 3x3 does not divide
        return self.fc(torch.cat([small.flatten(1), odd.view(odd.size(0), -1)], 1))


@pytest.mark.parametrize("make", ["pools", "torchvision:resnet18", "torchvision:densenet121"])
def test_export_of_converted_models_keeps_relu_on_kept_positions_and_matches_pytorch(make, tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    from fastmask.pi.export import build_onnx, relu_elements

    torch.manual_seed(0)
    size = {"pools": 8, "torchvision:resnet18": 16}.get(make, 32)
    plain = _Pools() if make == "pools" else external.build_plain(make, 3)
    model = randomized(external.convert_plain(plain, make, 3, size), 0)
    proto, manifest, _ = build_onnx(model)
    assert relu_elements(proto) == fm.relu_count(model) == manifest["relu_count"]
    session = onnxruntime.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    x = torch.randn(3, 3, size, size)
    with torch.no_grad():
        expected = model(x)
    got = torch.from_numpy(session.run(None, {"input": x.numpy()})[0])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
    if make == "pools":
        kinds = {node.op_type for node in proto.graph.node}
        assert {"MatMul", "AveragePool", "MaxPool", "Concat", "Mul"} <= kinds  # every path was taken


def test_fastmask_export_command_on_a_converted_checkpoint(builder, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    from fastmask.checkpoint import save_model

    other = tmp_path / "relu6.safetensors"
    save_model(external.build(f"{builder}:build", 3, 8), other)
    assert cli.export_main([str(other)]) == 2
    assert "cannot lower six (ReLU6)" in capsys.readouterr().err
    model = randomized(external.build(f"{builder}:relu_only", 3, 8), 1)
    path = tmp_path / "m.safetensors"
    save_model(model, path)
    assert cli.export_main([str(path)]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert f"{fm.relu_count(model):,} of 512 ReLUs kept" in out
    difference = float(out.split("max |logit difference|")[1].split()[0])
    assert difference < 1e-4


# ---- fastmask.linearize --------------------------------------------------------------------------------------------
class Tiny(nn.Module):
    def __init__(self, num_classes=3):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 16, num_classes)

    def forward(self, x):
        x = F.max_pool2d(torch.relu(self.bn(self.conv(x))), 2)
        return self.fc(x.flatten(1))


SMALL = dict(drc=20, rt=2, finetune_epochs=1, score_subset=32, adt=50.0, finetune_target_epochs=1, device="cpu")


def _toy_tensors(n=90):
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(n) % 3
    images = (torch.randint(0, 60, (n, 8, 8, 3), generator=generator) + 80 * labels.view(-1, 1, 1, 1)).to(torch.uint8)
    return images, labels


def test_linearize_returns_each_target_and_resumes_to_the_same_masks(tmp_path):
    torch.manual_seed(0)
    model = Tiny()
    images, labels = _toy_tensors()
    out = tmp_path / "run"
    result = fm.linearize(model, (images, labels), targets=[200, 150], out=str(out), **SMALL)
    assert sorted(result) == [150, 200]
    for budget, entry in result.items():
        assert fm.relu_count(entry.model) == budget == sum(int(m.sum()) for m in entry.masks.values())
        # the saved model is the returned one
        again = load_model(out / "targets" / str(budget) / "model.safetensors")
        x = torch.randn(2, 3, 8, 8)
        torch.testing.assert_close(again.eval()(x), entry.model.eval()(x))
    # the same call with resume=True finds every stage done and returns the same masks
    resumed = fm.linearize(model, (images, labels), targets=[200, 150], out=str(out), resume=True, **SMALL)
    for budget in (200, 150):
        assert all(torch.equal(resumed[budget].masks[k], result[budget].masks[k]) for k in result[budget].masks)
    assert model.conv.weight.grad is None  # the caller's model is not trained in place


def test_linearize_takes_a_torch_dataset_without_an_out_dir():
    images, labels = _toy_tensors(60)
    dataset = torch.utils.data.TensorDataset(images.permute(0, 3, 1, 2).float() / 255, labels)
    result = fm.linearize(Tiny(), dataset, targets=[220], **SMALL)
    assert fm.relu_count(result[220].model) == 220
    with pytest.raises(FastmaskError, match="no setting 'dcr'"):
        fm.linearize(Tiny(), dataset, targets=[220], dcr=3)


# ---- folder datasets -----------------------------------------------------------------------------------------------
def _image_folder(root: Path, splits: dict[str, int], size=(40, 20)) -> None:
    """Class k's images are a solid colour (k*100, 50, 200 - k*100) with a 4-pixel black border on the left and the
    right edge, which the center crop must cut away."""
    from PIL import Image

    for split, count in splits.items():
        for k in range(2):
            folder = root / split / f"class_{k}" if split else root / f"class_{k}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                image = Image.new("RGB", size, (k * 100, 50, 200 - k * 100))
                for x in list(range(4)) + list(range(size[0] - 4, size[0])):
                    for y in range(size[1]):
                        image.putpixel((x, y), (0, 0, 0))
                image.save(folder / f"{i}.png")


@pytest.mark.parametrize("layout", ["train_val_test", "train_test", "train_val", "single"])
def test_folder_layouts_splits_and_center_crop(tmp_path, layout):
    from fastmask import data

    splits = {"train_val_test": {"train": 6, "val": 2, "test": 3}, "train_test": {"train": 6, "test": 3},
              "train_val": {"train": 6, "val": 3}, "single": {"": 10}}[layout]
    _image_folder(tmp_path / "images", splits)
    ds = data.load_dataset(f"folder:{tmp_path / 'images'}", val_size=2, image_size=8)
    assert ds.num_classes == 2 and ds.classes == ["class_0", "class_1"] and ds.train_x.shape[1:] == (3, 8, 8)
    expected = {"train_val_test": (12, 4, 6), "train_test": (10, 2, 6), "train_val": (10, 2, 6),
                "single": (14, 2, 4)}[layout]
    assert (len(ds.train_y), len(ds.val_y), len(ds.test_y)) == expected
    # 40x20 -> 16x8 by the shorter side, then the middle 8 columns: no border pixel survives
    for x, y in ((ds.train_x, ds.train_y), (ds.test_x, ds.test_y)):
        colours = torch.tensor([[0, 50, 200], [100, 50, 100]], dtype=torch.uint8)
        assert torch.equal(x, colours[y].view(-1, 3, 1, 1).expand_as(x).contiguous())
    # normalization: from the train split, unless given
    mean, std = data.channel_stats(ds.train_x)
    assert ds.mean == pytest.approx(mean) and ds.std == pytest.approx(std)
    given = data.load_dataset(f"folder:{tmp_path / 'images'}", val_size=2, image_size=8, mean=[0.5], std=[0.25])
    assert given.mean == (0.5, 0.5, 0.5) and given.std == (0.25, 0.25, 0.25)


def test_folder_is_decoded_once_into_the_cache(tmp_path, monkeypatch):
    from fastmask import data

    _image_folder(tmp_path / "images", {"train": 3, "test": 1})
    first = data.load_dataset(f"folder:{tmp_path / 'images'}", val_size=1, image_size=8)
    assert list(Path(data.decode_cache_dir()).glob("folder-*-8-train-*.npy"))

    def no_decoding(*args):
        raise AssertionError("decoded again")

    monkeypatch.setattr(data, "_decode_fitted", no_decoding)
    again = data.load_dataset(f"folder:{tmp_path / 'images'}", val_size=1, image_size=8)
    assert torch.equal(first.train_x, again.train_x) and torch.equal(first.test_x, again.test_x)


def test_polynomial_and_both_methods_on_a_converted_model_then_export(builder, npz, tmp_path, capsys):
    """--method both --replacement polynomial: the site after a BN gets coefficients, the one after the residual add
    keeps the identity; both methods land on their targets exactly, and the export matches PyTorch."""
    onnxruntime = pytest.importorskip("onnxruntime")
    from fastmask.pi.export import build_onnx, relu_elements

    out = tmp_path / "run"
    argv = ["--dataset", f"npz:{npz}", "--arch", f"{builder}:relu_only", "--method", "both", "--replacement",
            "polynomial", "--ref-budget", "400", "--snl-epochs", "1", "--snl-finetune-epochs", "0",
            "--snl-target-epochs", "1", "--out", str(out)] + TINY
    assert cli.main(argv) == 0, capsys.readouterr().err
    for folder in ("targets", "snl_targets"):
        for budget in (300, 250):
            model = load_model(out / folder / str(budget) / "model.safetensors").eval()
            assert fm.relu_count(model) == budget
            sites = [site for _, site in fm.masked_sites(model)]
            assert [site.coeffs is not None for site in sites] == [True, False]
            proto, _, _ = build_onnx(model)
            assert relu_elements(proto) == budget
            session = onnxruntime.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
            x = torch.randn(4, 3, 8, 8)
            with torch.no_grad():
                expected = model(x)
            got = torch.from_numpy(session.run(None, {"input": x.numpy()})[0])
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


# ---- scoring on converted models -------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["torchvision:resnet18", "torchvision:densenet121"])
def test_converted_stages_compose_to_the_model_and_scoring_matches_one_candidate_at_a_time(arch):
    from fastmask.search.scoring import first_differing_block, score_hypotheses

    torch.manual_seed(0)
    model = randomized(external.build(arch, 10, 32), 3)
    x = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        staged = model.stem(x)
        for block in model.blocks:
            staged = block(staged)
        torch.testing.assert_close(model.head(staged), model(x), rtol=0, atol=0)
    masks = fm.MaskSet(model)
    in_blocks = {id(m) for block in model.blocks for m in block.modules() if isinstance(m, fm.MaskedReLU)}
    assert in_blocks <= {id(site) for site in masks.sites} and len(in_blocks) >= len(masks.sites) - 2
    generator = torch.Generator().manual_seed(4)
    late = masks.offsets[len(masks.sites) // 2]  # candidates in the second half of the sites: a shared prefix
    present = masks.present()
    pool = present[present >= late]
    candidates = [pool[torch.randperm(len(pool), generator=generator)[:50]] for _ in range(3)]
    assert first_differing_block(model, candidates) > 0
    labels = torch.randint(0, 10, (6,), generator=generator)
    scores = score_hypotheses(model, candidates, x, labels, batch_size=6)
    saved = masks.snapshot()
    for k, candidate in enumerate(candidates):  # the reference: each candidate alone, a plain forward
        masks.remove(candidate)
        with torch.no_grad():
            logits = model(x)
        masks.restore(saved)
        assert int(scores.correct[k]) == int((logits.argmax(1) == labels).sum())
        assert float(scores.loss[k]) == pytest.approx(float(F.cross_entropy(logits, labels)), rel=1e-4, abs=1e-5)
