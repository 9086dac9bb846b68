"""Packed export and reload (qsearch.export)."""

from __future__ import annotations

import copy
import functools
import json

import numpy as np
import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

from qsearch import QSearchError
from qsearch.export import export_model, load_model, pack_codes, read_metadata, unpack_codes
from qsearch.qlayers import QUANT_LAYERS, quantize_model
from qsearch.spaces import get_family

WIDTH = 0.5
PATTERN = (1, 2, 3, 4)


def build(candidate_json: str) -> nn.Module:
    fam = get_family("resnet20")
    width = json.loads(candidate_json)["width"]
    return fam.build(fam.plan(width), in_channels=3, num_classes=10)


def layer_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


@functools.cache
def _trained(scheme: str) -> tuple[nn.Module, str, list[str]]:
    torch.manual_seed(0)
    names = layer_names(build(json.dumps({"width": WIDTH})))
    bits = [8, *(PATTERN[i % len(PATTERN)] for i in range(len(names) - 2)), 8]
    candidate = json.dumps({"w_bits": bits, "a_bits": 4, "width": WIDTH})
    model = quantize_model(build(candidate), dict(zip(names, bits)), 4, scheme=scheme)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(3):  # a few steps: moves weights and sets activation ranges
        loss = nn.functional.cross_entropy(
            model(torch.randn(8, 3, 16, 16)), torch.randint(0, 10, (8,))
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), candidate, names


def trained_model(scheme: str) -> tuple[nn.Module, str, list[str]]:
    """A small ResNet-20 (width 0.5, bits 8/1/2/3/4/.../8) after 3 QAT steps on random data."""
    model, candidate, names = _trained(scheme)
    return copy.deepcopy(model), candidate, names


@pytest.mark.parametrize("scheme", ["dualprecision", "asym", "dorefa"])
def test_round_trip_gives_identical_predictions(tmp_path, scheme):
    model, candidate, names = trained_model(scheme)
    path = tmp_path / "model.safetensors"
    sizes = export_model(model, candidate, path, layer_names=names)
    loaded = load_model(path, build)
    x = torch.randn(16, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    for name, layer in loaded.named_modules():
        if isinstance(layer, QUANT_LAYERS):
            ref = dict(model.named_modules())[name]
            assert layer.w_bits == ref.w_bits and layer.frozen
    assert sizes["total_bytes"] == path.stat().st_size
    assert sum(v for k, v in sizes.items() if k != "total_bytes") == sizes["total_bytes"]


def test_code_bytes_match_model_size(tmp_path):
    model, candidate, names = trained_model("dualprecision")
    sizes = export_model(model, candidate, tmp_path / "m.safetensors", layer_names=names)
    modules = dict(model.named_modules())
    # C_size of Eq. (6), DualPrecision: bits x Cin/groups x Kh x Kw summed over filters
    c_size = sum(modules[n].w_bits * modules[n].weight.numel() for n in names)
    assert sizes["code_bytes"] == pytest.approx(c_size / 8, rel=0.01)
    assert sizes["scale_bytes"] > 0 and sizes["float_bytes"] > 0 and sizes["metadata_bytes"] > 0


def test_metadata_and_reexport(tmp_path):
    model, candidate, names = trained_model("dualprecision")
    export_model(model, candidate, tmp_path / "a.safetensors", layer_names=names)
    meta = read_metadata(tmp_path / "a.safetensors")
    assert meta["candidate"] == candidate
    assert [layer["name"] for layer in json.loads(meta["layers"])] == names
    loaded = load_model(tmp_path / "a.safetensors", build)
    export_model(loaded, candidate, tmp_path / "b.safetensors", layer_names=names)
    a, b = load_file(tmp_path / "a.safetensors"), load_file(tmp_path / "b.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert read_metadata(tmp_path / "b.safetensors") == meta  # (header byte order may differ)


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_unpack_round_trip(bits):
    codes = np.random.default_rng(bits).integers(0, 2**bits, size=1001).astype(np.uint8)
    packed = pack_codes(codes, bits)
    assert packed.nbytes == -(-1001 * bits // 8)
    assert np.array_equal(unpack_codes(packed, bits, 1001), codes)


def test_bad_paths_give_clear_errors(tmp_path):
    with pytest.raises(QSearchError, match="no exported model"):
        load_model(tmp_path / "missing.safetensors", build)
    (tmp_path / "junk.safetensors").write_bytes(b"not a model")
    with pytest.raises(QSearchError, match="not a safetensors file"):
        load_model(tmp_path / "junk.safetensors", build)
    model, candidate, names = trained_model("dualprecision")
    with pytest.raises(QSearchError, match="existing directory"):
        export_model(model, candidate, tmp_path / "no" / "dir.safetensors", layer_names=names)
    with pytest.raises(QSearchError, match="named_modules"):
        export_model(model, candidate, tmp_path / "m.safetensors", layer_names=["nope"])


def test_wrong_width_is_reported(tmp_path):
    model, candidate, names = trained_model("dualprecision")
    export_model(model, candidate, tmp_path / "m.safetensors", layer_names=names)
    with pytest.raises(QSearchError, match="same width"):
        load_model(tmp_path / "m.safetensors", lambda c: build(json.dumps({"width": 1.0})))
