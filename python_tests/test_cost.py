"""fastmask.cost: workloads counted from the model, predictions that follow the unit costs (an emptied site costs no
round), networks, the fit; and the shipped CrypTen units against real two-party runs of three models with different
masks (within 5% of bytes and rounds)."""
import dataclasses
import importlib.util
import math

import pytest
import torch

import fastmask as fm
from fastmask import cost
from fastmask.errors import FastmaskError


def tiny(kept_fraction=0.3, emptied=(), polynomial=False, seed=0):
    torch.manual_seed(seed)
    model = fm.models.create("resnet18", 10, 16, width=2, in_channels=1, polynomial=polynomial)
    generator = torch.Generator().manual_seed(seed + 1)
    for index, (_, site) in enumerate(fm.masked_sites(model)):
        site.mask.copy_((torch.rand(site.mask.shape, generator=generator) < kept_fraction) & (index not in emptied))
        if site.coeffs is not None:
            site.coeffs.data = torch.randn(site.coeffs.shape, generator=generator)
    return model.eval()


def test_workload_counts_kept_relus_sites_products_and_linear_layers():
    model = tiny(0.3, emptied=(2, 7))
    load = cost.workload(model)
    assert load.relus == fm.relu_count(model)
    assert load.sites == 14 and len(load.kept) == 16
    assert sum(load.products) == 0
    assert len(load.linear) == 21  # stem, 16 block convs, 3 shortcuts, the classifier
    conv1 = load.linear[0]
    assert conv1.input_elements == 1 * 16 * 16 and conv1.weight_elements == 2 * 1 * 3 * 3
    assert conv1.macs == 2 * 16 * 16 * 9
    assert load.linear[-1].macs == 10 * 16  # linear: 16 features (width 2 * 8) to 10 classes
    assert load.io_elements == 1 * 16 * 16 + 10  # the image's shares in, the logits' out
    assert conv1.output_elements == 2 * 16 * 16 and load.linear[-1].output_elements == 10

    poly = tiny(0.3, emptied=(2,), polynomial=True)
    load = cost.workload(poly)
    for (_, site), products in zip(fm.masked_sites(poly), load.products):
        expected = 0 if site.coeffs is None else int((~site.mask & (site.coeffs[:, 2] != 0).view(-1, 1, 1)).sum())
        assert products == expected
    assert load.product_sites > 0


@pytest.mark.parametrize("name", sorted(cost.PROTOCOLS))
def test_an_emptied_site_drops_its_rounds_and_its_relus_bytes(name):
    protocol = cost.get_protocol(name)
    load = cost.workload(tiny(0.3))
    emptied = load.with_kept([0] + list(load.kept[1:]))
    full, cut = cost.predict(load, protocol), cost.predict(emptied, protocol)
    assert full.rounds - cut.rounds == pytest.approx(protocol.rounds_per_site + protocol.rounds_per_relu * load.kept[0])
    assert full.bytes - cut.bytes == pytest.approx(protocol.bytes_per_relu * load.kept[0] + protocol.bytes_per_site)
    wan = cost.NETWORKS["wan"]
    per_relu, per_site = cost.site_saving(protocol, wan)
    assert full.latency(wan) - cut.latency(wan) == pytest.approx(per_relu * load.kept[0] + per_site)


def test_secret_weights_pay_for_linear_layers():
    load = cost.workload(tiny(0.3))
    public, secret = cost.predict(load, cost.CRYPTEN_PUBLIC), cost.predict(load, cost.CRYPTEN_SECRET)
    elements = sum(layer.input_elements + layer.weight_elements for layer in load.linear)
    assert secret.bytes - public.bytes == pytest.approx(16.0 * elements)
    assert secret.rounds - public.rounds == pytest.approx(len(load.linear))


def test_cheetah_layers_send_a_message_per_2048_output_elements_each_way():
    """A conv's truncation goes out in messages of at most 2,048 elements, one each way (measured: 2,048 elements one
    send action a party, 3,072 two); its bytes are 3 per element however they are split."""
    load = cost.workload(tiny(0.3))
    layer = load.linear[0]
    wider = dataclasses.replace(load, linear=(dataclasses.replace(layer, output_elements=2049),) + load.linear[1:])
    at_limit = dataclasses.replace(load, linear=(dataclasses.replace(layer, output_elements=2048),) + load.linear[1:])
    p = cost.SPU_CHEETAH
    assert cost.predict(wider, p).rounds - cost.predict(at_limit, p).rounds == 2  # one more message each way
    assert cost.predict(wider, p).bytes - cost.predict(at_limit, p).bytes == pytest.approx(p.bytes_per_linear_output)
    assert cost.predict(wider, cost.CRYPTEN_PUBLIC).rounds == cost.predict(at_limit, cost.CRYPTEN_PUBLIC).rounds


def test_latency_is_compute_plus_rounds_times_rtt_plus_bytes_over_bandwidth():
    c = cost.Cost("x", bytes=1_000_000, rounds=100, seconds_compute=0.5)
    network = cost.Network("n", bandwidth_mbit=80.0, rtt_ms=20.0)
    assert c.latency(network) == pytest.approx(0.5 + 100 * 0.020 + 8e6 / 80e6)
    assert cost.Cost("x", 0, 3, None).latency(network) == pytest.approx(0.06)


def test_parse_network():
    assert cost.parse_network("wan") == cost.NETWORKS["wan"]
    assert cost.parse_network("LAN") == cost.NETWORKS["lan"]
    custom = cost.parse_network("200,20")
    assert (custom.bandwidth_mbit, custom.rtt_ms) == (200.0, 20.0)
    for bad in ("fast", "0,10", "100,-1", "1,2,3", "nan,4"):
        with pytest.raises(FastmaskError, match="--network"):
            cost.parse_network(bad)
    with pytest.raises(FastmaskError, match="--protocol"):
        cost.get_protocol("tls")


def test_fit_recovers_the_units_it_is_given():
    truth = dataclasses.replace(cost.CRYPTEN_PUBLIC, bytes_per_relu=123.0, rounds_per_site=7.0, bytes_fixed=40.0,
                                rounds_fixed=3.0, bytes_per_product=20.0, rounds_per_product_site=1.0,
                                seconds_fixed=0.1, seconds_per_relu=1e-5, seconds_per_site=0.02)
    runs = []
    for seed, (fraction, emptied, polynomial) in enumerate([(1.0, (), False), (0.3, (), False), (0.1, (1, 4), False),
                                                            (0.05, (0, 3, 5, 9), False), (0.2, (2,), True)]):
        load = cost.workload(tiny(fraction, emptied, polynomial, seed))
        predicted = cost.predict(load, truth)
        runs.append(cost.Measurement(load, truth.name, predicted.bytes, predicted.rounds, predicted.seconds_compute))
    fitted, rows = cost.fit(runs, cost.CRYPTEN_PUBLIC)
    for field in ("bytes_per_relu", "rounds_per_site", "bytes_fixed", "rounds_fixed", "bytes_per_product",
                  "rounds_per_product_site", "seconds_fixed", "seconds_per_relu", "seconds_per_site"):
        assert getattr(fitted, field) == pytest.approx(getattr(truth, field), rel=1e-6, abs=1e-9), field
    assert all(abs(r["bytes_error_percent"]) < 1e-6 and abs(r["rounds_error_percent"]) < 1e-6 for r in rows)
    with pytest.raises(FastmaskError, match="at least 3 runs"):
        cost.fit(runs[:2], cost.CRYPTEN_PUBLIC)


def test_summary_lists_every_protocol_and_network():
    row = cost.summary(cost.workload(tiny(0.3, emptied=(0,))))
    assert row["sites"] == 15 and row["relus"] > 0 and row["macs"] > 0
    assert set(row["protocols"]) == set(cost.PROTOCOLS)
    for values in row["protocols"].values():
        assert {"bytes", "rounds", "lan_seconds", "wan_seconds"} <= set(values)
        assert values["wan_seconds"] > values["lan_seconds"] > 0


crypten_missing = importlib.util.find_spec("crypten") is None or importlib.util.find_spec("onnx") is None


@pytest.mark.skipif(crypten_missing, reason="CrypTen is not installed (pip install -e .[pi])")
def test_shipped_crypten_units_predict_real_runs_within_5_percent(tmp_path):
    """Three models with different masks (one with four sites emptied by hand, one polynomial), public weights, and
    one of them with secret weights: predicted bytes and rounds within 5% of the two-party run's; emptying sites by
    hand drops the measured rounds exactly as predicted."""
    from fastmask import data
    from fastmask.pi.export import export_model
    from fastmask.pi.two_party import run_two_party

    dataset = data.load_dataset("digits")
    images = data.normalize(dataset.test_x[:1], dataset, "cpu")
    models = {"dense": tiny(0.5, seed=3), "emptied": tiny(0.5, emptied=(0, 5, 9, 14), seed=3),
              "polynomial": tiny(0.2, emptied=(3,), polynomial=True, seed=4)}
    jobs = []
    for name, model in models.items():
        export_model(model, tmp_path / f"{name}.onnx")
        jobs.append({"name": name, "onnx": str(tmp_path / f"{name}.onnx"), "mode": "public"})
    jobs.append({"name": "dense", "onnx": str(tmp_path / "dense.onnx"), "mode": "secret"})
    results = run_two_party(jobs, images, timeout=600)
    measured = {}
    for result in results:
        protocol = cost.CRYPTEN_PUBLIC if result["mode"] == "public" else cost.CRYPTEN_SECRET
        predicted = cost.predict(cost.workload(models[result["name"]]), protocol)
        assert math.isclose(predicted.bytes, result["bytes"], rel_tol=0.05), (result["name"], result["mode"])
        assert math.isclose(predicted.rounds, result["rounds"], rel_tol=0.05), (result["name"], result["mode"])
        measured[(result["name"], result["mode"])] = result["rounds"]
    dropped = measured[("dense", "public")] - measured[("emptied", "public")]
    assert dropped == 4 * cost.CRYPTEN_PUBLIC.rounds_per_site


def test_fastmask_pi_predict_writes_rows_without_running_parties(tmp_path, capsys):
    from fastmask.checkpoint import save_model
    from fastmask.cli import pi_main

    model = tiny(0.3, emptied=(1, 2))
    save_model(model, tmp_path / "model.safetensors")
    code = pi_main([str(tmp_path / "model.safetensors"), "--predict", "--out", str(tmp_path / "out"),
                    "--protocol", "crypten-public", "--network", "wan", "--network", "200,5"])
    assert code == 0
    rows = __import__("json").loads((tmp_path / "out" / "predict.json").read_text())
    assert [r["model"] for r in rows] == [str(tmp_path / "model.safetensors"), "all-ReLU (same weights)"]
    model_row, baseline_row = rows
    expected = cost.predict(cost.workload(model), cost.CRYPTEN_PUBLIC)
    assert model_row["bytes"] == round(expected.bytes) and model_row["rounds"] == expected.rounds
    assert model_row["sites"] == 14 and baseline_row["sites"] == 16
    assert baseline_row["rounds"] - model_row["rounds"] == 2 * cost.CRYPTEN_PUBLIC.rounds_per_site
    assert set(model_row["latency_seconds"]) == {"wan", "200Mbit/5ms"}
    assert "predicted, no two-party run" in capsys.readouterr().out


@pytest.mark.parametrize("extra, message", [(["--protocol", "tls"], "--protocol takes"),
                                            (["--network", "fast"], "--network takes")])
def test_fastmask_pi_predict_bad_choices_are_one_line(tmp_path, capsys, extra, message):
    from fastmask.checkpoint import save_model
    from fastmask.cli import pi_main

    save_model(tiny(0.3), tmp_path / "model.safetensors")
    assert pi_main([str(tmp_path / "model.safetensors"), "--predict", "--out", str(tmp_path / "out"), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (tmp_path / "out").exists()
