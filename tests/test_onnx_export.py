"""ONNX export (qsearch.onnx_export), checked by running the files in ONNX Runtime."""

from __future__ import annotations

import copy
import functools
import json

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
from onnx import numpy_helper

from qsearch import QSearchError
from qsearch.cli import main
from qsearch.data import DATASETS, Splits, TensorSplit
from qsearch.onnx_export import (
    AGREEMENT_MIN,
    compare_with_torch,
    export_onnx,
    runtime_containers,
)
from qsearch.qlayers import QUANT_LAYERS, quantize_model
from qsearch.readers import make_synthetic
from qsearch.spaces import get_family
from qsearch.train import TrainConfig, train

PATTERN = (1, 2, 4, 8)  # free layers cycle through these; first and last layer 8 bits
WIDTH = {"resnet20": 0.5, "mobilenetv2-cifar": 0.25}


def container(bits: int) -> str:
    """The type a ``bits``-bit layer is stored as: the smallest that ONNX Runtime loads."""
    return f"INT{min(c for c in runtime_containers() if c >= bits)}"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread: the tests' machine has two busy cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@functools.cache
def splits() -> Splits:
    """The synthetic 4-class 16x16 task, with a 1000-image test split."""
    x, y, xt, yt = make_synthetic(seed=1, n_train=1600, n_test=1000)
    stats = {"mean": (float(x.mean()) / 255,), "std": (float(x.std()) / 255,)}

    def split(images, labels):
        return TensorSplit(torch.from_numpy(images[:, None].copy()), torch.from_numpy(labels),
                           **stats)

    return Splits(split(x, y), split(x[:200], y[:200]), split(xt, yt), DATASETS["synthetic"])


def layer_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


@functools.cache
def _trained(family: str, scheme: str, bits: tuple[int, ...] = PATTERN) -> tuple:
    torch.manual_seed(0)
    fam = get_family(family)
    model = fam.build(fam.plan(WIDTH[family]), in_channels=1, num_classes=4)
    names = layer_names(model)
    w_bits = [8, *(bits[i % len(bits)] for i in range(len(names) - 2)), 8]
    candidate = json.dumps({"family": family, "w_bits": w_bits, "a_bits": 4})
    quantize_model(model, dict(zip(names, w_bits)), 4, scheme=scheme)
    train(model, splits(), TrainConfig(steps=30, batch_size=32, lr=0.05, eval_every_steps=30))
    return model.eval(), candidate


def trained(family: str, scheme: str, bits: tuple[int, ...] = PATTERN) -> tuple:
    """A model of the family with mixed 1/2/4/8-bit weights and 4-bit activations, after
    30 QAT steps on the synthetic task (a private copy)."""
    model, candidate = _trained(family, scheme, bits)
    return copy.deepcopy(model), candidate


def initializers(path) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in onnx.load(str(path)).graph.initializer}


@pytest.mark.parametrize("family", ["resnet20", "mobilenetv2-cifar"])
@pytest.mark.parametrize("scheme", ["dualprecision", "dorefa"])
def test_onnx_runtime_agrees_with_pytorch_on_the_test_split(family, scheme, tmp_path, capsys):
    model, candidate = trained(family, scheme)
    r = export_onnx(model, candidate, tmp_path / "m.onnx", spec_json='{"seed": 0}')
    onnx.checker.check_model(str(tmp_path / "m.onnx"), full_check=True)
    check = compare_with_torch(r["path"], model, splits().test.batches(500), threads=1)
    with capsys.disabled():
        print(f"\n{family} {scheme}: ONNX Runtime vs PyTorch on {check['images']} test images: "
              f"top-1 agreement {check['agreement']:.4%}, max |logit diff| "
              f"{check['max_logit_diff']:.3g}, file {r['total_bytes']:,} B")
    assert check["images"] == 1000 and check["agreement"] >= AGREEMENT_MIN
    assert np.isfinite(check["max_logit_diff"])
    # what each layer was stored as, in the summary and in the file
    stored = {info["name"]: info for info in r["layers"]}
    inits = initializers(r["path"])
    assert len(stored) == len(layer_names(model))
    for i, (name, info) in enumerate(stored.items()):
        assert info["bits"] == model.get_submodule(name).w_bits
        assert info["stored_as"] == container(info["bits"])
        assert onnx.TensorProto.DataType.Name(inits[f"w{i}"].data_type) == info["stored_as"]
    assert {info["stored_as"] for info in r["layers"]} >= {"INT4", "INT8"}


def test_weight_initializers_hold_the_training_codes(tmp_path):
    """Decoded by onnx itself, each integer initializer is the layer's offset-binary codes
    minus 2^(b-1), so the packing matches the ONNX INT2/INT4 layout."""
    model, candidate = trained("resnet20", "dualprecision")
    r = export_onnx(model, candidate, tmp_path / "m.onnx")
    inits = initializers(r["path"])
    for i, info in enumerate(r["layers"]):
        layer = model.get_submodule(info["name"])
        u, _, _ = layer.weight_codes()
        codes = numpy_helper.to_array(inits[f"w{i}"]).astype(np.int64)
        assert codes.shape == tuple(layer.weight.shape)
        expected = u.numpy().astype(np.int64) - 2 ** (layer.w_bits - 1)
        assert np.array_equal(codes.reshape(len(codes), -1), expected)


def test_summary_sizes_and_metadata(tmp_path):
    model, candidate = trained("resnet20", "dualprecision", bits=(2, 4, 8))
    r = export_onnx(model, candidate, tmp_path / "m.onnx", spec_json='{"seed": 0}')
    # 2/4/8-bit layers fill their containers: weight bytes are C_size/8 up to byte rounding
    assert r["weight_bytes"] == pytest.approx(r["c_size_bytes"], abs=len(r["layers"]))
    assert r["total_bytes"] == (tmp_path / "m.onnx").stat().st_size
    assert r["weight_bytes"] + r["param_bytes"] + r["graph_bytes"] == r["total_bytes"]
    assert r["opset"] == (25 if 2 in runtime_containers() else 21) and r["notes"] == []
    meta = {p.key: p.value for p in onnx.load(r["path"]).metadata_props}
    assert meta["candidate"] == candidate and meta["spec"] == '{"seed": 0}'
    assert meta["qsearch_version"] == __import__("qsearch").__version__


def test_unloadable_container_falls_back_and_says_so(tmp_path, monkeypatch):
    """Where ONNX Runtime cannot load INT2, 1- and 2-bit layers take INT4, and the summary
    says so; the file still runs and agrees."""
    monkeypatch.setattr("qsearch.onnx_export.runtime_containers", lambda: (4, 8))
    model, candidate = trained("resnet20", "dualprecision")
    r = export_onnx(model, candidate, tmp_path / "m.onnx")
    low = [info for info in r["layers"] if info["bits"] <= 2]
    assert low and all(info["stored_as"] == "INT4" and info["note"] for info in low)
    assert any("cannot load INT2" in note and "stored as INT4" in note for note in r["notes"])
    assert r["opset"] == 21
    batches = list(splits().test.batches(500))[:1]
    assert compare_with_torch(r["path"], model, batches, threads=1)["agreement"] >= 0.99


def test_float_model_exports_as_float(tmp_path):
    """The benchmark's float baseline: same exporter, no quantizers, float weights."""
    torch.manual_seed(0)
    fam = get_family("mobilenetv2-cifar")
    model = fam.build(fam.plan(0.5), in_channels=1, num_classes=4).eval()
    r = export_onnx(model, "{}", tmp_path / "f.onnx")
    assert r["weight_bytes"] == 0 and r["c_size_bytes"] == 0
    assert {info["stored_as"] for info in r["layers"]} == {"FLOAT"}
    ops = {n.op_type for n in onnx.load(r["path"]).graph.node}
    assert not ops & {"QuantizeLinear", "DequantizeLinear", "BatchNormalization"}
    batches = list(splits().test.batches(200))[:1]
    check = compare_with_torch(r["path"], model, batches, threads=1)
    assert check["agreement"] == 1.0 and check["max_logit_diff"] < 1e-4


def test_bad_models_give_clear_errors(tmp_path):
    fam = get_family("resnet20")
    model = fam.build(fam.plan(0.25), in_channels=1, num_classes=4)
    quantize_model(model, dict.fromkeys(layer_names(model), 2), 4)
    with pytest.raises(QSearchError, match="never calibrated: train the model"):
        export_onnx(model.eval(), "{}", tmp_path / "m.onnx")
    odd = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Sigmoid(), nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(QSearchError, match=r"cannot export Sigmoid \(1\) to ONNX"):
        export_onnx(odd, "{}", tmp_path / "m.onnx")
    with pytest.raises(QSearchError, match="candidate_json is not valid JSON"):
        export_onnx(odd, "not json", tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()
    layer = next(m for m in model.modules() if isinstance(m, QUANT_LAYERS) and m.act_quant)
    layer.act_quant.bits = torch.tensor(3.5)
    with pytest.raises(QSearchError, match="set act_quant.bits to an int"):
        export_onnx(model, "{}", tmp_path / "m.onnx")


def test_cli_exports_onnx_and_checks_it_in_onnx_runtime(tmp_path, capsys, monkeypatch):
    from qsearch.space import SearchSpace

    monkeypatch.setattr("os.cpu_count", lambda: 1)  # the export trains on one thread here

    space = SearchSpace("resnet20", "synthetic")
    cand = space.candidate([PATTERN[i % 4] for i in range(len(space.free_layers))], width=0.25)
    (tmp_path / "spec.json").write_text(json.dumps({
        "strategy": "uniform", "budget": "6KB", "model": "resnet20", "dataset": "synthetic"}))
    (tmp_path / "final.json").write_text(json.dumps({"candidate": cand.to_dict()}))
    assert main(["export", str(tmp_path), "--format", "onnx", "--steps", "5"]) == 0
    out = capsys.readouterr().out
    assert f"wrote {tmp_path / 'model.onnx'} (ONNX opset" in out
    assert "integer weights" in out and "C_size/8 =" in out and "INT2" in out
    assert "top-1 agreement 100.00%" in out or "top-1 agreement 99.9" in out
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "model.onnx")).metadata_props}
    assert json.loads(meta["candidate"]) == cand.to_dict()
    assert json.loads(meta["spec"])["model"] == "resnet20"
