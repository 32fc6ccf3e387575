"""Two-party CrypTen inference of exported models: decrypted predictions agree with plaintext, and with public weights
the bytes follow the ReLU count (the cut ReLUs are what is saved). Kept small: tiny models, a few images."""
import importlib.util
import json

import pytest
import torch

import fastmask as fm
from fastmask.checkpoint import save_model

pytest.importorskip("onnx")
if importlib.util.find_spec("crypten") is None:  # plain importorskip would fail on CrypTen's stale torch import
    pytest.skip("CrypTen is not installed (pip install -e .[pi])", allow_module_level=True)

from helpers import batchnorm_statistics_from  # noqa: E402

from fastmask.cli import pi_main  # noqa: E402
from fastmask.pi.export import export_model  # noqa: E402
from fastmask.pi.measure import all_relu_copy  # noqa: E402
from fastmask.pi.two_party import run_two_party  # noqa: E402


@pytest.fixture(scope="module")
def digits():
    from fastmask import data

    dataset = data.load_dataset("digits")
    return dataset, data.normalize(dataset.test_x[:32], dataset, "cpu")


def tiny_masked_model(images: torch.Tensor, kept_fraction: float, arch: str = "resnet18", width: int = 2,
                      polynomial: bool = False) -> torch.nn.Module:
    """A tiny model on 16x16 digits (resnet18 at width 2: 3,840 ReLUs), BN statistics from real images, random
    masks and (when polynomial) non-trivial coefficients."""
    torch.manual_seed(0)
    model = fm.models.create(arch, 10, 16, width=width, in_channels=1, polynomial=polynomial)
    generator = torch.Generator().manual_seed(1)
    for _, site in fm.masked_sites(model):
        site.mask.copy_(torch.rand(site.mask.shape, generator=generator) < kept_fraction)
        if polynomial:
            site.coeffs.data = 0.05 * torch.randn(site.coeffs.shape, generator=generator) + torch.tensor([0, 1.0, 0])
    return batchnorm_statistics_from(model, images)


def test_public_weight_bytes_follow_the_relu_count(tmp_path, digits):
    _, images = digits
    model = tiny_masked_model(images, kept_fraction=0.3)
    baseline = all_relu_copy(model)
    export_model(model, tmp_path / "model.onnx")
    export_model(baseline, tmp_path / "baseline.onnx")
    x = images[:3]
    jobs = [{"name": "baseline", "onnx": str(tmp_path / "baseline.onnx"), "mode": "public"},
            {"name": "model", "onnx": str(tmp_path / "model.onnx"), "mode": "public"}]
    full, cut = run_two_party(jobs, x, timeout=300)
    relu_ratio = fm.relu_count(model) / fm.relu_count(baseline)
    assert 0.2 < relu_ratio < 0.4
    assert abs(cut["bytes"] / full["bytes"] - relu_ratio) <= 0.1 * relu_ratio
    assert cut["rounds"] == full["rounds"] > 0  # every site still evaluates some ReLUs: same depth
    for result, plain in ((full, baseline), (cut, model)):
        with torch.no_grad():
            expected = plain(x)
        assert result["logits"].shape == expected.shape
        assert torch.allclose(result["logits"], expected, atol=1e-2)
        assert torch.equal(result["logits"].argmax(1), expected.argmax(1))


def test_pi_command_in_a_run_folder(tmp_path, capsys, digits):
    _, images = digits
    run = tmp_path / "run"
    target = run / "targets" / "1200"
    (run / "summary.json").parent.mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps({"targets": [{"budget": 1200}, {"budget": 600}]}))
    (run / "config.yaml").write_text("data:\n  dataset: digits\n")
    # wide_resnet22_8 with polynomials: CrypTen also runs its BN Mul/Add and the polynomial's Mul/Add nodes.
    model = tiny_masked_model(images, kept_fraction=0.5, arch="wide_resnet22_8", width=4, polynomial=True)
    save_model(model, target / "model.safetensors")
    out = tmp_path / "pi"
    assert pi_main([str(target / "model.safetensors"), "--images", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "trusted dealer" in printed and "Delphi or Cheetah" in printed
    rows = json.loads((out / "pi.json").read_text())
    assert json.loads((target / "pi.json").read_text()) == rows
    summary = json.loads((run / "summary.json").read_text())  # the run's report carries them too
    assert summary["targets"][0]["pi"] == rows and "pi" not in summary["targets"][1]
    assert {(r["role"], r["mode"]) for r in rows} == {(role, mode) for role in ("model", "baseline")
                                                      for mode in ("public", "secret")}
    for row in rows:
        assert {"model", "mode", "relu_count", "bytes", "rounds", "seconds_per_image", "agreement"} <= set(row)
        assert row["agreement"] == 1.0 and row["images"] == 2 and row["bytes"] > 0
        assert (row["runtime"], row["protocol"], row["dealer"]) == ("crypten", "crypten-tfp", True)
        assert row["send_actions"] is None and row["setup_bytes"] is None and row["rounds"] > 0
    by = {(r["role"], r["mode"]): r for r in rows}
    assert by["model", "secret"]["bytes"] > by["model", "public"]["bytes"]
    assert by["model", "public"]["relu_count"] < by["baseline", "public"]["relu_count"]


@pytest.mark.parametrize("argv,message", [
    (["missing.safetensors"], "does not exist"),
    (["{ckpt}", "--images", "0"], "--images must be at least 1"),
    (["{ckpt}", "--modes", "private"], "--modes takes"),
    (["{ckpt}", "--dataset", "cifar10", "--data-dir", "{tmp}/nowhere"], "does not exist"),
])
def test_pi_command_bad_input_is_one_line(tmp_path, capsys, argv, message):
    checkpoint = tmp_path / "model.safetensors"
    save_model(fm.models.create("resnet18", 10, 16, width=2, in_channels=1), checkpoint)
    assert pi_main([a.format(ckpt=checkpoint, tmp=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fastmask-pi: error:") and message in err and "\n" not in err


def test_pi_command_refuses_a_model_of_another_dataset(tmp_path, capsys):
    checkpoint = tmp_path / "model.safetensors"
    save_model(fm.models.create("resnet18", 100, 32, width=2), checkpoint)  # a cifar100 model on digits
    assert pi_main([str(checkpoint), "--images", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastmask-pi: error:") and "pass the model's --dataset" in err


# densenet121 runs one image: its 120 sites take CrypTen minutes per image on a small CPU
@pytest.mark.parametrize("arch, size, count", [("torchvision:resnet18", 16, 3), ("torchvision:densenet121", 32, 1)])
def test_a_converted_model_runs_two_party_and_agrees_with_plaintext(tmp_path, arch, size, count):
    """Torchvision models through fastmask.convert (resnet18 with its MaxPool; densenet121 with its concatenations,
    one of a single tensor per block, and BNs that read them): the decrypted predictions equal PyTorch's, and the
    exported Relu nodes see exactly the kept ReLUs."""
    from fastmask.models import external
    from fastmask.pi.export import build_onnx, relu_elements

    torch.manual_seed(0)
    model = external.build(arch, 10, size).eval()
    generator = torch.Generator().manual_seed(2)
    for _, site in fm.masked_sites(model):
        site.mask.copy_(torch.rand(site.mask.shape, generator=generator) < 0.3)
    images = torch.randn(3, 3, size, size, generator=generator)
    model = batchnorm_statistics_from(model, images)
    assert relu_elements(build_onnx(model)[0]) == fm.relu_count(model)
    export_model(model, tmp_path / "model.onnx")
    images = images[:count]
    (result,) = run_two_party([{"name": "model", "onnx": str(tmp_path / "model.onnx"), "mode": "public"}], images,
                              timeout=600)
    with torch.no_grad():
        plain = model(images)
    assert torch.equal(result["logits"].argmax(1), plain.argmax(1))
