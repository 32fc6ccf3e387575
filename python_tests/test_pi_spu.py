"""Two-party SecretFlow SPU inference of exported models (fastmask-pi --runtime spu-cheetah / spu-semi2k). Kept small:
tiny models (3,840 ReLUs at most), one or two images.

SPU lives in its own environment (fastmask.pi.spu_env): the tests that run it skip, saying so, when that environment
is absent; with FASTMASK_REQUIRE_SPU=1 (CI sets it once the environment installed) they fail instead."""
import json
import os
import subprocess

import numpy as np
import pytest
import torch

import fastmask as fm
from fastmask.checkpoint import save_model

pytest.importorskip("onnx")

from helpers import batchnorm_statistics_from  # noqa: E402

from fastmask import cost  # noqa: E402
from fastmask.cli import pi_main  # noqa: E402
from fastmask.pi import spu_env  # noqa: E402
from fastmask.pi.export import export_model  # noqa: E402
from fastmask.pi.measure import all_relu_copy  # noqa: E402
from fastmask.pi.spu_runtime import link_counters, run_spu  # noqa: E402


@pytest.fixture(scope="module")
def spu_python():
    python = spu_env.find()
    if python is None:
        why = f"the SPU environment is not installed (run `{spu_env.INSTALL_COMMAND}` or set {spu_env.ENV_VAR})"
        if os.environ.get("FASTMASK_REQUIRE_SPU") == "1":
            pytest.fail(why + ", and FASTMASK_REQUIRE_SPU=1")
        pytest.skip(why)
    return python


@pytest.fixture(scope="module")
def digits():
    from fastmask import data

    dataset = data.load_dataset("digits")
    return dataset, data.normalize(dataset.test_x[:16], dataset, "cpu")


def tiny_model(images: torch.Tensor, kept_fraction: float, arch: str = "resnet18", width: int = 2,
               polynomial: bool = False, emptied: int | None = None) -> torch.nn.Module:
    """A tiny model on 16x16 digits (resnet18 at width 2: 3,840 ReLUs), BN statistics from real images, random masks,
    (when polynomial) non-trivial coefficients, and site number `emptied` with every ReLU removed."""
    torch.manual_seed(0)
    model = fm.models.create(arch, 10, 16, width=width, in_channels=1, polynomial=polynomial)
    generator = torch.Generator().manual_seed(1)
    for index, (_, site) in enumerate(fm.masked_sites(model)):
        site.mask.copy_(torch.rand(site.mask.shape, generator=generator) < kept_fraction)
        if index == emptied:
            site.mask.fill_(False)
        if polynomial:
            site.coeffs.data = 0.05 * torch.randn(site.coeffs.shape, generator=generator) + torch.tensor([0, 1.0, 0])
    return batchnorm_statistics_from(model, images).eval()


RELU_OPS = ("pphlo.less", "pphlo.multiply")  # a ReLU is max(x, 0): a comparison and a select (a product)


@pytest.mark.parametrize("arch,width,polynomial,emptied", [
    ("resnet18", 2, False, None),
    ("resnet18", 2, False, 2),  # an emptied site: no Relu node, its positions pass through
    ("wide_resnet22_8", 4, True, None),  # BN as Mul + Add, the polynomial's products
])
def test_lowering_matches_onnxruntime(tmp_path, digits, spu_python, arch, width, polynomial, emptied):
    onnxruntime = pytest.importorskip("onnxruntime")
    _, images = digits
    model = tiny_model(images, 0.4, arch, width, polynomial, emptied)
    export_model(model, tmp_path / "model.onnx")
    x = images[:4].numpy()
    np.save(tmp_path / "x.npy", x)
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    expected = session.run(None, {session.get_inputs()[0].name: x})[0]
    subprocess.run([str(spu_python), str(spu_env.PARTY_SCRIPT), "plain", "--onnx", str(tmp_path / "model.onnx"),
                    "--inputs", str(tmp_path / "x.npy"), "--out", str(tmp_path / "y.npy")], check=True,
                   env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    got = np.load(tmp_path / "y.npy")
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() < 1e-4


def test_cheetah_agrees_and_bytes_follow_the_kept_relus(tmp_path, digits, spu_python):
    _, images = digits
    model = tiny_model(images, 0.3)
    baseline = all_relu_copy(model)
    emptied = tiny_model(images, 0.3, emptied=2)
    for name, m in (("baseline", baseline), ("model", model), ("emptied", emptied)):
        export_model(m, tmp_path / f"{name}.onnx")
    x = images[:3]  # three: the median run is the steady one even if Cheetah refills its OT pool during one
    jobs = [{"name": name, "onnx": str(tmp_path / f"{name}.onnx"), "mode": "public"}
            for name in ("baseline", "model", "emptied")]
    full, cut, hollow = run_spu(jobs, x, protocol="cheetah", timeout=600)
    for result, plain in ((full, baseline), (cut, model), (hollow, emptied)):
        predicted = cost.predict(cost.workload(plain), cost.SPU_CHEETAH)  # the shipped units, fitted on other models
        assert predicted.bytes == pytest.approx(result["steady_bytes"], rel=0.05)
        assert predicted.rounds == pytest.approx(result["steady_send_actions"], rel=0.05)
        with torch.no_grad():
            expected = plain(x)
        assert result["logits"].shape == expected.shape
        assert torch.allclose(result["logits"], expected, atol=1e-2)
        assert torch.equal(result["logits"].argmax(1), expected.argmax(1))
        assert result["rounds"] is None and result["weight_bytes"] == 0
        assert abs(sum(result["op_bytes"].values()) - result["bytes"]) < 1e-6 * result["bytes"]
        # Cheetah's OT setup is paid once per job, apart from the online bytes, and is larger than them here
        assert result["setup_bytes"] > result["bytes"] > 0
        assert result["warmup_bytes"] == pytest.approx(result["bytes"] + result["setup_bytes"])
    relu_ratio = fm.relu_count(model) / fm.relu_count(baseline)
    assert 0.2 < relu_ratio < 0.4
    relu_bytes = [sum(r["op_bytes"].get(op, 0) for op in RELU_OPS) for r in (full, cut)]
    assert abs(relu_bytes[1] / relu_bytes[0] - relu_ratio) <= 0.1 * relu_ratio  # the ReLUs' bytes follow their count
    assert relu_ratio < cut["bytes"] / full["bytes"] < 1  # truncations of the convolutions stay
    assert cut["send_actions"] == full["send_actions"] > 0  # every site still evaluates some ReLUs
    assert hollow["send_actions"] < cut["send_actions"]  # an emptied site sends nothing


def test_cheetah_secret_weights(tmp_path, digits, spu_python):
    _, images = digits
    model = tiny_model(images, 0.3)
    export_model(model, tmp_path / "model.onnx")
    x = images[:1]
    jobs = [{"name": "model", "onnx": str(tmp_path / "model.onnx"), "mode": mode} for mode in ("public", "secret")]
    public, secret = run_spu(jobs, x, protocol="cheetah", timeout=600)
    with torch.no_grad():
        expected = model(x)
    assert torch.allclose(secret["logits"], expected, atol=1e-2)
    assert secret["weight_bytes"] > 0 and secret["setup_bytes"] > secret["weight_bytes"]
    assert secret["bytes"] > public["bytes"]  # secret x secret convolutions (HE) on top of the ReLUs


def test_pi_command_spu_semi2k_in_a_run_folder(tmp_path, capsys, digits, spu_python):
    _, images = digits
    run = tmp_path / "run"
    target = run / "targets" / "1200"
    target.mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps({"targets": [{"budget": 1200}]}))
    (run / "config.yaml").write_text("data:\n  dataset: digits\n")
    save_model(tiny_model(images, 0.5), target / "model.safetensors")
    crypten_rows = [{"runtime": "crypten", "model": label, "role": role, "mode": "public", "relu_count": 1,
                     "bytes": 1, "rounds": 1, "seconds_per_image": 1.0, "agreement": 1.0, "accuracy": 1.0, "images": 1}
                    for label, role in (("targets/1200/model.safetensors", "model"),
                                        ("all-ReLU (same weights)", "baseline"))]
    (target / "pi.json").write_text(json.dumps(crypten_rows))  # another runtime's rows of the same model stay
    out = tmp_path / "pi"
    assert pi_main([str(target / "model.safetensors"), "--runtime", "spu-semi2k", "--modes", "public",
                    "--images", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| spu-semi2k | semi2k-tfp | yes |" in printed and "party 0 deals them" in printed
    rows = json.loads((out / "pi.json").read_text())
    assert {(r["role"], r["runtime"], r["dealer"]) for r in rows} == {("model", "spu-semi2k", True),
                                                                      ("baseline", "spu-semi2k", True)}
    for row in rows:
        assert row["agreement"] == 1.0 and row["rounds"] is None and row["send_actions"] > 0
        assert row["setup_bytes"] is not None and row["bytes"] > 0
        # two images: the median image is their mean
        assert (row["steady_bytes"], row["steady_send_actions"]) == (row["bytes"], row["send_actions"])
    kept = json.loads((target / "pi.json").read_text())
    assert kept == crypten_rows + rows
    assert json.loads((run / "summary.json").read_text())["targets"][0]["pi"] == kept


def test_missing_spu_environment_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(spu_env.ENV_VAR, str(tmp_path / "nowhere" / "python"))
    spu_env._probe.cache_clear()
    checkpoint = tmp_path / "model.safetensors"
    save_model(fm.models.create("resnet18", 10, 16, width=2, in_channels=1), checkpoint)
    assert pi_main([str(checkpoint), "--runtime", "spu-cheetah", "--images", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fastmask-pi: error:") and "\n" not in err
    assert spu_env.INSTALL_COMMAND in err and spu_env.ENV_VAR in err
    spu_env._probe.cache_clear()


def test_link_counters_read_each_run():
    log = """[info] [api.cc:172] [Profiling] SPU execution main completed, ...
[info] [api.cc:223] - pphlo.less, executed 2 times, duration 0.1s, send bytes 800 recv bytes 90, send actions 6, recv actions 6
[info] [api.cc:223] - pphlo.custom_call: spu.gather, executed 4 times, duration 0.01s, send bytes 0 recv bytes 0, send actions 0, recv actions 0
[info] [api.cc:223] - pphlo.convolution, executed 1 times, duration 0.1s, send bytes 120 recv bytes 9, send actions 1, recv actions 1
[info] [api.cc:233] Link details: total send bytes 920, recv bytes 99, send actions 7, recv actions 7
[info] [api.cc:233] Link details: total send bytes 5, recv bytes 0, send actions 1, recv actions 0
"""  # noqa: E501
    assert link_counters(log) == [(920, 7, {"pphlo.less": 800, "pphlo.convolution": 120}), (5, 1, {})]
