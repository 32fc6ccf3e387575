"""ONNX export for private inference: onnxruntime equals PyTorch, only kept ReLUs reach a Relu node, and the graph
holds no op a PI runtime would pay twice for (Where) or CrypTen would reject (ScatterElements, Identity)."""
import json

import numpy as np
import pytest
import torch

import fastmask as fm
from fastmask.checkpoint import save_model
from fastmask.errors import FastmaskError

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from helpers import batchnorm_statistics_from  # noqa: E402

from fastmask.cli import export_main  # noqa: E402
from fastmask.pi.export import build_onnx, companion_paths, export_model, relu_elements  # noqa: E402

FORBIDDEN_OPS = {"Where", "ScatterElements", "ScatterND", "Identity", "BatchNormalization"}


@pytest.fixture(scope="module")
def digits_images():
    """Real images: the first digits test images, normalized as training does."""
    from fastmask import data

    dataset = data.load_dataset("digits")
    return data.normalize(dataset.test_x[:24], dataset, "cpu")


def masked_model(arch: str, polynomial: bool, images: torch.Tensor, width: int, seed: int = 0) -> torch.nn.Module:
    """A small model with trained-looking BN statistics, sites fully kept, fully removed and partly kept, and (when
    polynomial) non-trivial coefficients."""
    torch.manual_seed(seed)
    model = fm.models.create(arch, 10, images.shape[-1], width=width, in_channels=images.shape[1],
                             polynomial=polynomial)
    generator = torch.Generator().manual_seed(seed + 1)
    for index, (_, site) in enumerate(fm.masked_sites(model)):
        kept_fraction = (0.3, 1.0, 0.0, 0.6)[index % 4]
        site.mask.copy_(torch.rand(site.mask.shape, generator=generator) < kept_fraction)
        if site.coeffs is not None:
            noise = 0.1 * torch.randn(site.coeffs.shape, generator=generator)
            site.coeffs.data = noise + torch.tensor([0.0, 1.0, 0.0])
    return batchnorm_statistics_from(model, images)


CASES = [("resnet18", False, 4), ("resnet18", True, 4), ("wide_resnet22_8", False, 8), ("wide_resnet22_8", True, 8)]


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"{c[0]}-{'polynomial' if c[1] else 'identity'}")
def exported(request, digits_images):
    arch, polynomial, width = request.param
    model = masked_model(arch, polynomial, digits_images, width)
    return model, *build_onnx(model)


def test_onnxruntime_matches_pytorch_and_counts_relus(exported, digits_images):
    model, proto, manifest, _ = exported
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": digits_images.numpy()})[0]
    with torch.no_grad():
        expected = model(digits_images).numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)
    assert relu_elements(proto) == fm.relu_count(model) == manifest["relu_count"]
    assert 0 < fm.relu_count(model) < sum(site.mask.numel() for _, site in fm.masked_sites(model))


def test_graph_holds_only_importable_ops(exported):
    model, proto, _, _ = exported
    ops = {node.op_type for node in proto.graph.node}
    assert not ops & FORBIDDEN_OPS
    assert {"Gather", "Concat", "Reshape", "Relu", "Constant"} <= ops
    # Integer initializers crash CrypTen's importer: every initializer is float, every index a Constant node.
    assert all(init.data_type == onnx.TensorProto.FLOAT for init in proto.graph.initializer)
    constants = {node.output[0] for node in proto.graph.node if node.op_type == "Constant"}
    for node in proto.graph.node:
        if node.op_type == "Gather":
            assert node.input[1] in constants
    # A polynomial is Mul/Add on the removed positions; an identity adds no node at all.
    polynomial = model.fastmask_spec["polynomial"]
    assert ("Mul" in ops) == (polynomial or isinstance(model, fm.models.WideResNet22))  # wrn: BN1 is Mul + Add


def test_all_kept_model_has_plain_relus(digits_images):
    model = fm.models.create("resnet18", 10, 16, width=2, in_channels=1).eval()
    proto, manifest, _ = build_onnx(model)
    ops = [node.op_type for node in proto.graph.node]
    assert "Gather" not in ops and ops.count("Relu") == len(fm.masked_sites(model))
    assert relu_elements(proto) == fm.relu_count(model) == 1920 * 2


def test_manifest_and_masks_beside_the_onnx_file(tmp_path, digits_images):
    from safetensors.torch import load_file

    model = masked_model("wide_resnet22_8", True, digits_images, 8)
    manifest = export_model(model, tmp_path / "model.onnx")
    manifest_path, masks_path = companion_paths(tmp_path / "model.onnx")
    assert json.loads(manifest_path.read_text()) == manifest
    masks = load_file(str(masks_path))
    sites = fm.masked_sites(model)
    assert [s["name"] for s in manifest["sites"]] == [name for name, _ in sites]
    for entry, (name, site) in zip(manifest["sites"], sites, strict=True):
        assert entry["shape"] == list(site.shape) and entry["kept"] == site.relu_count()
        assert entry["replacement"] == "polynomial"
        assert (entry["mask_key"], entry["coeffs_key"]) == (f"{name}.mask", f"{name}.coeffs")
        assert torch.equal(masks[f"{name}.mask"].bool(), site.mask)
        assert torch.equal(masks[f"{name}.coeffs"], site.coeffs.detach())
    assert sum(s["kept"] for s in manifest["sites"]) == manifest["relu_count"] == fm.relu_count(model)
    assert onnx.load(str(tmp_path / "model.onnx")).graph.output[0].name == "logits"


def test_soft_masks_are_refused(digits_images):
    model = fm.models.create("resnet18", 10, 16, width=2, in_channels=1).eval()
    site = fm.masked_sites(model)[0][1]
    site.alpha = torch.nn.Parameter(torch.ones(site.shape))
    with pytest.raises(FastmaskError, match="binary masks"):
        build_onnx(model)


def test_export_command(tmp_path, capsys, digits_images):
    checkpoint = tmp_path / "targets" / "300" / "model.safetensors"
    save_model(masked_model("resnet18", False, digits_images, 2), checkpoint)
    assert export_main([str(checkpoint)]) == 0
    out = capsys.readouterr().out
    assert "max |logit difference|" in out
    for path in (checkpoint.with_suffix(".onnx"), *companion_paths(checkpoint.with_suffix(".onnx"))):
        assert path.is_file()
    assert export_main([str(checkpoint), "--out", str(tmp_path / "x.onnx"), "--no-check"]) == 0
    assert (tmp_path / "x.json").is_file()


@pytest.mark.parametrize("argv,message", [
    (["missing.safetensors"], "does not exist"),
    (["{ckpt}", "--out", "{tmp}/model.txt"], "must name an .onnx file"),
    (["{ckpt}", "--bogus"], "unrecognized arguments"),
])
def test_export_command_bad_input_is_one_line(tmp_path, capsys, argv, message, digits_images):
    checkpoint = tmp_path / "model.safetensors"
    save_model(fm.models.create("resnet18", 10, 16, width=2, in_channels=1), checkpoint)
    argv = [a.format(ckpt=checkpoint, tmp=tmp_path) for a in argv]
    assert export_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fastmask-export: error:") and message in err and "\n" not in err
