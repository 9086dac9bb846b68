"""Export a trained quantized model as a packed ``safetensors`` file, and load it back.

File layout (one safetensors file, nothing pickled):

- ``<layer>.weight:codes`` (uint8): the layer's offset-binary codes ``u`` in [0, 2^b - 1]
  (:func:`qsearch.quant.weight_codes`), row-major over ``[Cout, Cin/groups * Kh * Kw]``,
  packed at exactly b bits each: code i occupies bits [i b, (i + 1) b) of a little-endian
  bit stream (least significant bit first, ``numpy.packbits(..., bitorder="little")``).
  Ternary layers take 2 bits a weight, binary ones 1 bit.
- ``<layer>.weight:scale`` (float32, ``[Cout]``): per-filter scales. float32, not float16,
  so that ``(u - zero) * scale`` reproduces the training-time weights bit for bit (32 bits
  per filter is under 1% of the codes of any filter with d >= 4 * 32 / b weights).
- ``<layer>.weight:zero`` (float32, ``[Cout]``): only when the zero point differs across
  filters (asymmetric per-channel); otherwise it is one number in the layer's metadata.
- every other state_dict entry as is (BN, biases, activation ranges / PACT clips, float
  layers), under its state_dict key.
- header metadata (str -> str): ``format``, ``format_version``, ``qsearch_version``,
  ``candidate`` (the candidate JSON, verbatim) and ``layers`` (JSON list: name, kind, bits,
  shape, scheme, input activation bits and quantizer, zero).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import safe_open, save_file

from qsearch import QSearchError, __version__
from qsearch.actquant import PACTActQuant
from qsearch.qlayers import QUANT_LAYERS, first_layer_name, quantize_model
from qsearch.quant import is_float_bits

FORMAT = "qsearch-packed"
FORMAT_VERSION = 1


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned codes (< 2**bits) at ``bits`` bits each, little-endian bit order."""
    planes = (codes.reshape(-1, 1).astype(np.uint8) >> np.arange(bits, dtype=np.uint8)) & 1
    return np.packbits(planes.reshape(-1), bitorder="little")


def unpack_codes(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_codes`: ``count`` codes of ``bits`` bits as uint8."""
    planes = np.unpackbits(packed, count=count * bits, bitorder="little").reshape(count, bits)
    return (planes << np.arange(bits, dtype=np.uint8)).sum(axis=1, dtype=np.uint8)


def _act_info(layer: nn.Module) -> tuple[int | None, str | None]:
    act = layer.act_quant
    if act is None or is_float_bits(act.bits):
        return None, None
    if isinstance(act.bits, torch.Tensor):
        raise QSearchError(
            "activation bit-widths are still a tensor (fractional): set act_quant.bits to an int"
        )
    return int(act.bits), "pact" if isinstance(act, PACTActQuant) else "ema"


def _check_export_args(
    model: nn.Module, candidate_json: str, path: str | os.PathLike, layer_names: list[str]
) -> tuple[Path, dict[str, nn.Module]]:
    """Validate :func:`export_model`'s arguments; returns the path and the modules by name."""
    try:
        json.loads(candidate_json)
    except (TypeError, ValueError) as e:
        raise QSearchError(
            f"candidate_json is not valid JSON ({e}): pass Candidate.to_json()"
        ) from None
    path = Path(path)
    if path.is_dir() or not path.parent.is_dir():
        raise QSearchError(
            f"cannot write {str(path)!r}: give a file path inside an existing directory"
        )
    modules = dict(model.named_modules())
    bad = [n for n in layer_names if not isinstance(modules.get(n), (nn.Conv2d, nn.Linear))]
    if bad:
        raise QSearchError(
            f"layer_names {bad} are not nn.Conv2d/nn.Linear modules of the model: "
            "use names from model.named_modules()"
        )
    return path, modules


def _pack_layer(
    name: str, layer: nn.Module, tensors: dict[str, torch.Tensor]
) -> tuple[dict, int, int]:
    """Pack one quantized layer's codes and scales into ``tensors``.

    Returns the layer's metadata entries (``bits``, and ``zero`` when one number), its code
    bytes and its scale bytes.
    """
    bits = int(layer.w_bits)
    u, zero, scale = layer.weight_codes()
    packed = torch.from_numpy(pack_codes(u.cpu().numpy(), bits))
    tensors[f"{name}.weight:codes"] = packed
    tensors[f"{name}.weight:scale"] = scale.detach().float().cpu().contiguous()
    code_bytes, scale_bytes = packed.numel(), 4 * scale.numel()
    info: dict = {"bits": bits}
    if bool((zero == zero[0]).all()):
        info["zero"] = float(zero[0])
    else:
        tensors[f"{name}.weight:zero"] = zero.detach().float().cpu().contiguous()
        scale_bytes += 4 * zero.numel()
    return info, code_bytes, scale_bytes


def _layer_entry(
    name: str, layer: nn.Module, tensors: dict[str, torch.Tensor], state: dict
) -> tuple[dict, int, int]:
    """Metadata of one layer; a quantized layer's weight is packed and dropped from ``state``.

    Returns the metadata dict, its code bytes and its scale bytes.
    """
    info = {
        "name": name,
        "kind": "linear" if isinstance(layer, nn.Linear) else "conv",
        "shape": list(layer.weight.shape),
        "bits": 32,
        "quantized": False,
    }
    if not isinstance(layer, QUANT_LAYERS):
        return info, 0, 0
    if isinstance(layer.w_bits, torch.Tensor):
        raise QSearchError(
            f"layer {name!r} has tensor bit-widths (fractional or kernel-wise): the "
            "export stores one integer bit-width per layer; set layer.w_bits to an int"
        )
    a_bits, act = _act_info(layer)
    info.update(quantized=True, scheme=layer.scheme, a_bits=a_bits, act=act)
    if is_float_bits(layer.w_bits):
        return info, 0, 0
    packed_info, code_bytes, scale_bytes = _pack_layer(name, layer, tensors)
    info.update(packed_info)
    del state[f"{name}.weight"]
    return info, code_bytes, scale_bytes


def _write(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> int:
    """Write atomically (a reader never sees a half-written file); returns the file size."""
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return path.stat().st_size


def export_model(
    model: nn.Module, candidate_json: str, path: str | os.PathLike, *, layer_names: list[str]
) -> dict[str, int]:
    """Write ``model`` (after :func:`~qsearch.qlayers.quantize_model` and training) to ``path``.

    ``layer_names`` are the candidate's layers in inventory order; each must be an
    ``nn.Conv2d``/``nn.Linear`` of the model. Quantized layers not named are exported too
    (after the named ones), so the file always rebuilds the whole model.

    Returns the byte breakdown: ``code_bytes`` (packed codes), ``scale_bytes`` (scales and
    per-filter zero points), ``float_bytes`` (all other tensors), ``metadata_bytes`` (the
    safetensors header: tensor index plus metadata, and its 8-byte length) and
    ``total_bytes`` (the file size).
    """
    path, modules = _check_export_args(model, candidate_json, path, layer_names)
    quant = [n for n, m in model.named_modules() if isinstance(m, QUANT_LAYERS)]
    order = list(dict.fromkeys([*layer_names, *quant]))

    state = {k: v.detach() for k, v in model.state_dict().items()}
    tensors: dict[str, torch.Tensor] = {}
    layers, code_bytes, scale_bytes = [], 0, 0
    for name in order:
        info, n_codes, n_scales = _layer_entry(name, modules[name], tensors, state)
        layers.append(info)
        code_bytes += n_codes
        scale_bytes += n_scales

    float_bytes = 0
    for key, value in state.items():
        tensors[key] = value.cpu().clone().contiguous()  # clone: safetensors refuses shared storage
        float_bytes += value.numel() * value.element_size()

    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "qsearch_version": __version__,
        "candidate": candidate_json,
        "layers": json.dumps(layers),
    }
    total = _write(path, tensors, metadata)
    return {
        "code_bytes": code_bytes,
        "scale_bytes": scale_bytes,
        "float_bytes": float_bytes,
        "metadata_bytes": total - code_bytes - scale_bytes - float_bytes,
        "total_bytes": total,
    }


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The header metadata of an exported file (raises :class:`QSearchError` if not one)."""
    path = Path(path)
    if not path.is_file():
        raise QSearchError(f"no exported model at {str(path)!r}: check the path")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise QSearchError(f"{str(path)!r} is not a safetensors file ({e})") from None
    if meta.get("format") != FORMAT:
        raise QSearchError(f"{str(path)!r} is not a qsearch export (format {FORMAT!r} missing)")
    if int(meta.get("format_version", -1)) > FORMAT_VERSION:
        raise QSearchError(
            f"{str(path)!r} has format version {meta['format_version']}; this qsearch "
            f"({__version__}) reads up to {FORMAT_VERSION}: upgrade qsearch"
        )
    return meta


def _requantize(model: nn.Module, layers: list[dict]) -> None:
    """Recreate the exported quantized layers (and their input quantizers) in ``model``."""
    first = first_layer_name(model)
    for info in layers:
        if info["quantized"]:
            bits = None if info["bits"] == 32 else info["bits"]
            quantize_model(
                model,
                {info["name"]: bits},
                info["a_bits"],
                scheme=info["scheme"],
                first_layer_input_bits=info["a_bits"] if info["name"] == first else 8,
                act_scheme=info["act"],
            )


def _load_packed(f, info: dict, layer: nn.Module, path: str | os.PathLike) -> None:
    """Set ``layer``'s weight to ``(u - zero) * scale`` from the open file ``f``; freeze it."""
    name, bits, shape = info["name"], info["bits"], info["shape"]
    if list(layer.weight.shape) != shape:
        raise QSearchError(
            f"layer {name!r} is {list(layer.weight.shape)} in the model built from the "
            f"candidate but {shape} in {str(path)!r}: build_fn must rebuild the same width"
        )
    count = int(np.prod(shape))
    codes = f.get_tensor(f"{name}.weight:codes").numpy()
    u = torch.from_numpy(unpack_codes(codes, bits, count)).view(shape[0], -1)
    scale = f.get_tensor(f"{name}.weight:scale")
    zero = (
        f.get_tensor(f"{name}.weight:zero")
        if info.get("zero") is None
        else torch.full_like(scale, info["zero"])
    )
    w = ((u.to(scale.dtype) - zero[:, None]) * scale[:, None]).view(shape)
    with torch.no_grad():
        layer.weight.copy_(w)
    layer.frozen, layer.frozen_codes = True, (u, zero, scale)


def _read_tensors(
    path: str | os.PathLike, model: nn.Module, layers: list[dict]
) -> tuple[dict[str, torch.Tensor], set[str]]:
    """Load the packed weights into ``model``'s layers; returns the plain tensors by
    state_dict key and the keys of the packed weights."""
    modules = dict(model.named_modules())
    floats, packed = {}, set()
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
            if ":" not in key:
                floats[key] = f.get_tensor(key)
        for info in layers:
            if not info["quantized"] or info["bits"] == 32:
                continue
            _load_packed(f, info, modules[info["name"]], path)
            packed.add(f"{info['name']}.weight")
    return floats, packed


def _load_floats(model: nn.Module, floats: dict, packed: set[str], path: str | os.PathLike) -> None:
    """Load every plain tensor; the file and the model must have the same entries."""
    try:
        missing, unexpected = model.load_state_dict(floats, strict=False)
    except RuntimeError as e:
        raise QSearchError(
            f"{str(path)!r} does not fit the model built from its candidate: {e}"
        ) from None
    missing = sorted(set(missing) - packed)
    if missing or unexpected:
        raise QSearchError(
            f"{str(path)!r} does not fit the model built from its candidate: missing "
            f"{missing[:5]}, unexpected {sorted(unexpected)[:5]}: build_fn must build the "
            "same architecture"
        )


def load_model(path: str | os.PathLike, build_fn: Callable[[str], nn.Module]) -> nn.Module:
    """Rebuild an exported model, in eval mode, with the exact quantized weights.

    ``build_fn(candidate_json)`` returns a fresh float model of the right width. The
    quantized layers are recreated with :func:`~qsearch.qlayers.quantize_model`, their
    weights set to ``(u - zero) * scale`` and marked ``frozen`` (used as is, not
    re-quantized), and every other tensor is loaded from the file.
    """
    meta = read_metadata(path)
    layers = json.loads(meta["layers"])
    model = build_fn(meta["candidate"])
    _requantize(model, layers)
    floats, packed = _read_tensors(path, model, layers)
    _load_floats(model, floats, packed, path)
    return model.eval()


def _train_final(out: Path, train: dict | None, threads: int | None) -> tuple:
    """Train an experiment's final candidate (``final.json``) with its final recipe; returns
    the spec (compact JSON), the candidate, the space, the data splits and the model."""
    from qsearch.candidate import Candidate
    from qsearch.data import load_dataset
    from qsearch.pretrained import FINETUNE, load_pretrained
    from qsearch.spec import Spec, space_from_spec
    from qsearch.train import TrainConfig, set_threads

    if not (out / "final.json").exists() or not (out / "spec.json").exists():
        raise QSearchError(f"{str(out)!r} has no final candidate (final.json): export the "
                           "--out directory of a finished `qsearch run`")
    spec_dict = json.loads((out / "spec.json").read_text())
    spec = Spec.from_dict(spec_dict)
    cand = Candidate.from_dict(json.loads((out / "final.json").read_text())["candidate"])
    space = space_from_spec(spec)
    set_threads(threads or os.cpu_count() or 1)
    tuned = FINETUNE if spec.checkpoint else {}  # fine-tuned from the search's checkpoint
    config = TrainConfig.recipe(spec.dataset, **{**tuned, **spec.final_train,
                                                 **(train or {}), "seed": spec.seed})
    splits = load_dataset(spec.dataset, seed=spec.seed, **spec.data)
    torch.manual_seed(spec.seed)
    model = space.build(cand)
    if spec.checkpoint:
        load_pretrained(model, spec.checkpoint, spec.model)
    quantize_model(model, space.layer_bits(cand), cand.a_bits)

    def progress(m: dict, _state) -> None:
        print(f"  step {m['step']} train loss {m['train_loss']:.3f} val acc "
              f"{m.get('val_acc') or float('nan'):.2%}", flush=True)

    from qsearch.train import train as train_model

    train_model(model, splits, config, callback=progress)
    spec_json = json.dumps(spec_dict, sort_keys=True, separators=(",", ":"))
    return spec_json, cand, space, splits, model


EXPORT_FORMATS = ("safetensors", "onnx")


def check_export_format(fmt: str) -> None:
    if fmt not in EXPORT_FORMATS:
        raise QSearchError(f"export format {fmt!r} not known: choose safetensors (the default, "
                           "qsearch's packed file) or onnx (integer weights for ONNX Runtime), "
                           "e.g. --format onnx")


def export_experiment(out: str | os.PathLike, path: str | os.PathLike | None = None, *,
                      train: dict | None = None, threads: int | None = None,
                      fmt: str = "safetensors") -> dict:
    """Train an experiment's final candidate (``final.json``) with its final recipe, write
    the packed file, load it back and check it predicts identically on the test split.

    Returns the byte breakdown plus ``c_size_bytes`` (C_size/8 of the quantized layers),
    ``test_acc`` and ``identical`` (predictions of the reloaded model equal the trained
    one's on every test image). ``fmt="onnx"`` writes an ONNX graph instead
    (:func:`qsearch.onnx_export.export_checked`: its summary, and ``agreement`` and
    ``max_logit_diff`` of ONNX Runtime against the trained model on the test split).
    """
    from qsearch.candidate import FLOAT_BITS, Candidate
    from qsearch.train import evaluate

    check_export_format(fmt)
    out = Path(out)
    spec_json, cand, space, splits, model = _train_final(out, train, threads)
    test = splits.test
    model.eval()
    if fmt == "onnx":
        from qsearch.onnx_export import export_checked

        r = export_checked(model, cand.to_json(), path or out / "model.onnx", test,
                           spec_json=spec_json, threads=threads)
        return {**r, "test_acc": evaluate(model, test)[0]}
    path = Path(path or out / "model.safetensors")
    sizes = export_model(model, cand.to_json(), path, layer_names=[l.name for l in space.layers])
    loaded = load_model(path, lambda js: space.build(Candidate.from_json(js)))
    with torch.no_grad():
        same = all(torch.equal(model(x).argmax(1), loaded(x).argmax(1))
                   for x, _ in test.batches(512))
    quantized = [b < FLOAT_BITS for b in cand.w_bits]
    c_size = sum(b * n for b, n, q in zip(cand.w_bits, space.params(cand), quantized) if q)
    return {**sizes, "c_size_bytes": c_size / 8, "test_acc": evaluate(model, test)[0],
            "identical": same, "path": str(path)}


def export_report(r: dict) -> tuple[str, bool]:
    """What ``qsearch export`` prints for an :func:`export_experiment` result, and whether the
    exported file passed its check (identical predictions, or ONNX Runtime's agreement)."""
    if "agreement" in r:  # ONNX
        from qsearch.onnx_export import AGREEMENT_MIN, format_summary

        return (f"{format_summary(r)}\ntest accuracy {r['test_acc']:.2%}; ONNX Runtime "
                f"{r['onnxruntime']} (CPU) against PyTorch on the test split ({r['images']:,} "
                f"images): top-1 agreement {r['agreement']:.2%}, max |logit difference| "
                f"{r['max_logit_diff']:.3g}", r["agreement"] >= AGREEMENT_MIN)
    return (f"wrote {r['path']}: {r['total_bytes']:,} bytes = codes {r['code_bytes']:,} "
            f"(C_size/8 = {r['c_size_bytes']:,.0f}, {r['code_bytes'] / r['c_size_bytes']:.4f}x)"
            f" + scales {r['scale_bytes']:,} + float params {r['float_bytes']:,} + header "
            f"{r['metadata_bytes']:,}\ntest accuracy {r['test_acc']:.2%}; reloaded model "
            f"predicts identically on the test split: {'yes' if r['identical'] else 'NO'}",
            r["identical"])
