"""Export a trained quantized model as an ONNX graph with integer weights, for ONNX Runtime.

The model is traced with ``torch.fx`` (the quantized layers are leaves) and every node is
written as ONNX operators, so the graph computes what the PyTorch model computes in eval mode:

- **Weights.** A quantized conv/linear layer's weight is an integer initializer of the smallest
  container ONNX Runtime loads (INT2 for 1-2 bits, INT4 for 3-4, INT8 for 5-8), dequantized
  per output channel: ``DequantizeLinear(codes, scale, zero, axis=0)``, i.e.
  ``y = (x - x_zero_point) * x_scale`` (ONNX DequantizeLinear-25; INT4 since opset 21, INT2
  since 25: https://onnx.ai/onnx/operators/onnx__DequantizeLinear.html). The codes are
  qsearch's offset-binary codes ``u`` (:func:`qsearch.quant.weight_codes`) made signed,
  ``c = u - 2^(b-1)``, with the zero point moved alike. A zero point is stored only where it
  is not 0 (the asymmetric scheme). Two schemes have a half-integer zero point, which ONNX
  cannot hold: DoReFa (FracBits Eq. (3), zero n/2 with n = 2^b - 1 odd) and DualPrecision's
  binary layers (Eq. (4), codes +-1 = u - 1/2 scaled by 2 mean|W_i|); there the weight is
  ``(DequantizeLinear(c, 1) + 1/2) * s``: every step but the last is exact, so it is rounded
  once, as PyTorch's ``(u - z) * s``, not twice as ``DequantizeLinear(c, s, -1) - s/2``.
- **BatchNorm** after a conv is ``Mul(alpha) -> Add(beta)`` with PyTorch's own float32 terms,
  so it rounds as PyTorch does. Folded into the weight scales (4 bytes less a channel), it
  changes the last bit of some outputs, and an activation code at a rounding boundary then
  flips: on a MobileNetV2 that changed 3 of 2000 top-1 predictions.
- **Activations.** A layer's input quantizer (:mod:`qsearch.actquant`: EMA ranges or PACT) is
  a QuantizeLinear / DequantizeLinear pair with a uint8 container, then ``Clip`` to the
  quantizer's range (see :func:`_quantize_input` for why after, not before). QuantizeLinear-25
  is ``saturate(round(x / y_scale) + y_zero_point)`` with round half to even
  (https://onnx.ai/onnx/operators/onnx__QuantizeLinear.html), as ``torch.round``, so the
  codes are those of the PyTorch quantizer.

Where the installed ONNX Runtime cannot load a container (:func:`runtime_containers` tries
each once), the layer takes the next larger one and the summary says so.
"""

from __future__ import annotations

import functools
import operator
import os

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

from qsearch import QSearchError, __version__
from qsearch.actquant import EMAActQuant, PACTActQuant
from qsearch.export import _check_export_args, pack_codes
from qsearch.qlayers import QUANT_LAYERS
from qsearch.quant import is_float_bits

# (container bits, ONNX type, first opset whose DequantizeLinear takes it), smallest first
CONTAINERS = ((2, TensorProto.INT2, 25), (4, TensorProto.INT4, 21), (8, TensorProto.INT8, 13))
MIN_OPSET = 13  # per-axis DequantizeLinear
_TYPE_NAME = TensorProto.DataType.Name  # e.g. "INT4"
CPU = ["CPUExecutionProvider"]
INPUT, OUTPUT = "input", "logits"
AGREEMENT_MIN = 0.999  # top-1 agreement with PyTorch below which an export is reported as failed
SUPPORTED = ("Conv2d and Linear (plain or qsearch-quantized), BatchNorm2d after a Conv2d, ReLU, "
             "ReLU6, MaxPool2d, global average pooling, Flatten, Identity, Dropout, addition")


def _int_tensor(name: str, values: np.ndarray, container: tuple[int, int, int]) -> TensorProto:
    """Signed integers as a packed ONNX tensor: two's complement, element i in bits [i b,
    (i + 1) b) of a little-endian stream (the ONNX layout of INT4/INT2; qsearch's pack_codes)."""
    bits, onnx_type, _ = container
    v = np.asarray(values, np.int64)
    packed = pack_codes((v & ((1 << bits) - 1)).astype(np.uint8).reshape(-1), bits)
    return helper.make_tensor(name, onnx_type, v.shape, vals=packed.tobytes(), raw=True)


def _model(graph: onnx.GraphProto, opset: int) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              producer_name="qsearch", producer_version=__version__)
    model.ir_version = helper.find_min_ir_version_for(list(model.opset_import))
    return model


@functools.cache
def runtime_containers() -> tuple[int, ...]:
    """The weight containers (bits) that this ONNX Runtime loads and dequantizes exactly on
    CPU: one tiny DequantizeLinear model per container, at the container's opset."""
    accepted = []
    for container in CONTAINERS:
        bits, _, opset = container
        codes = np.arange(-(1 << (bits - 1)), 1 << (bits - 1)).reshape(1, -1)  # per axis 0
        inits = [_int_tensor("c", codes, container), numpy_helper.from_array(np.float32([.5]), "s")]
        out = helper.make_tensor_value_info("y", TensorProto.FLOAT, list(codes.shape))
        node = helper.make_node("DequantizeLinear", ["c", "s"], ["y"], axis=0)
        graph = helper.make_graph([node], "probe", [], [out], inits)
        try:
            sess = ort.InferenceSession(_model(graph, opset).SerializeToString(), providers=CPU)
            y = sess.run(None, {})[0]
        except Exception:  # noqa: BLE001 (ORT raises its own types: Fail, NotImplemented, ...)
            continue
        if np.array_equal(y, codes * 0.5):
            accepted.append(bits)
    return tuple(accepted)


def _container(bits: int, accepted: tuple[int, ...]) -> tuple[tuple[int, int, int], str | None]:
    """The smallest accepted container for ``bits``, and a note when it is not the smallest."""
    fits = [c for c in CONTAINERS if c[0] >= bits]
    usable = [c for c in fits if c[0] in accepted]
    if not usable:
        raise QSearchError(f"onnxruntime {ort.__version__} loads none of the integer weight "
                           f"types {[_TYPE_NAME(c[1]) for c in fits]}: install "
                           "onnxruntime>=1.24 (INT2 and INT4 DequantizeLinear on CPU)")
    if usable[0] is fits[0]:
        return usable[0], None
    return usable[0], (f"onnxruntime {ort.__version__} cannot load {_TYPE_NAME(fits[0][1])} "
                       f"weights: {bits}-bit layers stored as {_TYPE_NAME(usable[0][1])}")


class _Graph:
    """Nodes and initializers under construction, with short names (``v<k>``; a layer's
    tensors ``<kind><layer index>``): names take a share of a small model's file."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[TensorProto] = []
        self._shared: dict[tuple, str] = {}

    def node(self, op: str, inputs: list[str], *, name: str = "", **attrs) -> str:
        out = f"v{len(self.nodes)}"
        self.nodes.append(helper.make_node(op, inputs, [out], name=name, **attrs))
        return out

    def init(self, tensor: TensorProto) -> str:
        self.inits.append(tensor)
        return tensor.name

    def floats(self, name: str, values) -> str:
        return self.init(numpy_helper.from_array(np.asarray(values, np.float32), name))

    def scalar(self, value: float | int, dtype=np.float32) -> str:
        """A scalar initializer shared by every node that uses the same value and type."""
        key = (value, np.dtype(dtype).name)
        if key not in self._shared:
            array = np.array(value, dtype)
            self._shared[key] = self.init(numpy_helper.from_array(array, f"k{len(self._shared)}"))
        return self._shared[key]


def _act_params(aq: nn.Module, where: str) -> tuple[float, int, float, float]:
    """(scale, zero point, clip low, clip high) of a layer's input quantizer: the bounds are
    the dequantized values of codes 0 and 2^bits - 1."""
    if isinstance(aq.bits, torch.Tensor) or aq.bits > 8:
        raise QSearchError(f"{where}: activation bits {aq.bits} do not fit the uint8 container "
                           "of the ONNX export: set act_quant.bits to an int from 1 to 8")
    n = 2 ** int(aq.bits) - 1
    with torch.no_grad():
        if isinstance(aq, PACTActQuant):  # FracBits Eq. (3): alpha q_k(clamp(X, 0, alpha) / alpha)
            scale = aq.alpha.detach().float() / n  # as _PACT.forward computes it
            return float(scale), 0, 0.0, float(n * scale)
        if not isinstance(aq, EMAActQuant):
            raise QSearchError(f"{where}: unknown activation quantizer {type(aq).__name__}")
        if bool(torch.isnan(aq.running_min)):
            raise QSearchError(f"{where}: the activation range was never calibrated: train the "
                               "model (or run it in train mode on some batches) first")
        scale, zero = aq.qparams(aq.running_min, aq.running_max)
        return float(scale), int(zero), float(-zero * scale), float((n - zero) * scale)


def _quantize_input(g: _Graph, aq: nn.Module | None, x: str, where: str) -> str:
    """``QuantizeLinear(uint8) -> DequantizeLinear -> Clip`` for a layer's input quantizer.

    The Clip to the quantizer's range (codes 0..2^bits - 1 of the uint8 container) comes after
    the DequantizeLinear, at every bit-width: a DequantizeLinear that feeds a Conv/Gemm
    directly makes ONNX Runtime's QDQ optimizers round the bias to int32 at
    ``s_x s_w`` and float weights to int8 (WeightBiasQuantization) or fuse the layer into
    QLinearConv (which takes no INT2 weights in 1.32), each of which changes the numbers or
    fails to load. Clipping the dequantized value equals clamping the codes.
    """
    if aq is None or (not isinstance(aq.bits, torch.Tensor) and is_float_bits(aq.bits)):
        return x
    scale, zero, lo, hi = _act_params(aq, where)
    s, z = g.scalar(scale), g.scalar(zero, np.uint8)
    y = g.node("DequantizeLinear", [g.node("QuantizeLinear", [x, s, z]), s, z])
    return g.node("Clip", [y, g.scalar(lo), g.scalar(hi)])


@torch.no_grad()
def _batch_norm(g: _Graph, i: int, bn: nn.BatchNorm2d, x: str) -> str:
    """Eval-mode BatchNorm as ``x alpha + beta``, the terms computed as PyTorch's CPU kernel
    computes them (``batch_norm_cpu_collect_linear_and_constant_terms``), in float32."""
    alpha = 1 / torch.sqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        alpha = alpha * bn.weight
    beta = (bn.bias if bn.bias is not None else 0) - bn.running_mean * alpha
    mul = g.node("Mul", [x, g.floats(f"m{i}", alpha.cpu().reshape(-1, 1, 1))])
    return g.node("Add", [mul, g.floats(f"c{i}", beta.cpu().reshape(-1, 1, 1))])


def _int_weight(g: _Graph, i: int, name: str, layer: nn.Module,
                accepted: tuple[int, ...]) -> tuple[str, dict]:
    """``DequantizeLinear`` of the layer's integer codes (see the module docstring)."""
    bits = int(layer.w_bits)
    u, zero, scale = layer.weight_codes()
    off = 1 << (bits - 1)
    codes = (u.cpu().numpy().astype(np.int64) - off).reshape(layer.weight.shape)
    zero = zero.detach().cpu().double().numpy() - off
    half = bool((zero != np.floor(zero)).any())  # zero k - 1/2: DoReFa, binary DualPrecision
    if half and (zero != zero[0]).any():
        raise QSearchError(f"layer {name!r}: half-integer zero points that differ "
                           "across filters cannot be exported")
    zero = np.ceil(zero).astype(np.int64)
    scale = scale.detach().cpu().float().numpy()
    container, note = _container(bits, accepted)
    codes_t = _int_tensor(f"w{i}", codes, container)
    if half:  # (c - z) s = ((c - ceil z) + 1/2) s: exact until the one rounding of * s
        inputs = [g.init(codes_t), g.scalar(1.0)]
        if zero[0]:
            inputs.append(g.init(_int_tensor(f"z{i}", zero[0], container)))
        w = g.node("Add", [g.node("DequantizeLinear", inputs), g.scalar(0.5)])
        w = g.node("Mul", [w, g.floats(f"s{i}", scale.reshape(-1, *[1] * (codes.ndim - 1)))])
    else:
        inputs = [g.init(codes_t), g.floats(f"s{i}", scale)]
        if zero.any():
            inputs.append(g.init(_int_tensor(f"z{i}", zero, container)))
        w = g.node("DequantizeLinear", inputs, axis=0)
    info = {"bits": bits, "stored_as": _TYPE_NAME(container[1]),
            "weight_bytes": len(codes_t.raw_data), "note": note, "opset": container[2]}
    return w, info


def _layer(g: _Graph, i: int, name: str, layer: nn.Module, x: str, bn: nn.Module | None,
           accepted: tuple[int, ...]) -> tuple[str, dict]:
    """One conv/linear layer (input quantizer, weight, the BatchNorm after it) as ONNX nodes."""
    quantized = isinstance(layer, QUANT_LAYERS)
    x = _quantize_input(g, layer.act_quant, x, f"layer {name!r}") if quantized else x
    if quantized and isinstance(layer.w_bits, torch.Tensor):
        raise QSearchError(f"layer {name!r} has tensor bit-widths (fractional or kernel-wise): "
                           "set layer.w_bits to an int before exporting")
    if quantized and not is_float_bits(layer.w_bits):
        w, info = _int_weight(g, i, name, layer, accepted)
    else:
        w = g.floats(f"w{i}", layer.weight.detach().cpu())
        info = {"bits": 32, "stored_as": "FLOAT", "weight_bytes": 0, "note": None, "opset": 0}
    bias = [] if layer.bias is None else [g.floats(f"b{i}", layer.bias.detach().cpu())]
    inputs = [x, w, *bias]
    if isinstance(layer, nn.Linear):
        return g.node("Gemm", inputs, name=name, transB=1), {"name": name, **info}
    if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
        raise QSearchError(f"layer {name!r} pads with {layer.padding!r}/{layer.padding_mode!r}: "
                           "the ONNX export supports integer zero padding")
    attrs = {"strides": list(layer.stride), "pads": list(layer.padding) * 2,
             "dilations": list(layer.dilation), "group": layer.groups}
    defaults = {"strides": [1, 1], "pads": [0] * 4, "dilations": [1, 1], "group": 1}
    attrs = {k: v for k, v in attrs.items() if v != defaults[k]}  # a smaller file
    y = g.node("Conv", inputs, name=name, **attrs)
    return (y if bn is None else _batch_norm(g, i, bn, y)), {"name": name, **info}


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, QUANT_LAYERS) or super().is_leaf_module(m, qualname)


def _pair(v) -> list[int]:
    return list(v) if isinstance(v, (tuple, list)) else [v, v]


def _module_op(g: _Graph, m: nn.Module, x: str) -> str | None:
    """The ONNX nodes of a plain torch module (None when not supported)."""
    if isinstance(m, (nn.Identity, nn.Dropout)):
        return x
    if isinstance(m, nn.ReLU):
        return g.node("Relu", [x])
    if isinstance(m, nn.ReLU6):
        return g.node("Clip", [x, g.scalar(0.0), g.scalar(6.0)])
    if isinstance(m, nn.Flatten) and m.end_dim == -1:
        return g.node("Flatten", [x], axis=m.start_dim)
    if isinstance(m, nn.AdaptiveAvgPool2d) and _pair(m.output_size) == [1, 1]:
        return g.node("GlobalAveragePool", [x])
    if isinstance(m, nn.MaxPool2d) and not m.return_indices:
        p = _pair(m.padding)
        return g.node("MaxPool", [x], kernel_shape=_pair(m.kernel_size),
                      strides=_pair(m.stride or m.kernel_size), pads=p + p,
                      dilations=_pair(m.dilation), ceil_mode=int(m.ceil_mode))
    return None


_FUNCTIONS = {operator.add: "add", torch.add: "add", torch.relu: "relu", F.relu: "relu",
              torch.flatten: "flatten", F.adaptive_avg_pool2d: "gap"}


def _function_op(g: _Graph, node: fx.Node, args: list) -> str | None:
    """The ONNX nodes of a traced function or tensor method (None when not supported)."""
    kind = node.target if node.op == "call_method" else _FUNCTIONS.get(node.target)
    if kind == "add" and len(args) == 2 and all(isinstance(a, str) for a in args):
        return g.node("Add", args)
    if kind == "relu":
        return g.node("Relu", [args[0]])
    if kind == "flatten" and node.kwargs.get("end_dim", -1) == -1 and args[2:] in ([], [-1]):
        start = args[1] if len(args) > 1 else node.kwargs.get("start_dim", 0)
        return g.node("Flatten", [args[0]], axis=start)
    if kind == "gap" and _pair(args[1] if len(args) > 1 else node.kwargs["output_size"]) == [1, 1]:
        return g.node("GlobalAveragePool", [args[0]])
    return None


def _conv_batch_norms(graph: fx.Graph, modules: dict[str, nn.Module]) -> dict[fx.Node, fx.Node]:
    """BatchNorm node -> the conv node it follows (a conv used by nothing else)."""
    pairs = {}
    for node in graph.nodes:
        src = node.args[0] if node.args else None
        if (node.op == "call_module" and isinstance(modules[node.target], nn.BatchNorm2d)
                and isinstance(src, fx.Node) and src.op == "call_module"
                and isinstance(modules[src.target], nn.Conv2d) and len(src.users) == 1):
            pairs[node] = src
    return pairs


def build_graph(model: nn.Module, accepted: tuple[int, ...]) -> tuple[onnx.GraphProto, list[dict]]:
    """The ONNX graph of ``model`` in eval mode, and one entry per conv/linear layer."""
    modules = dict(model.named_modules())
    traced = _Tracer().trace(model)
    bns = _conv_batch_norms(traced, modules)  # each written with its conv
    bn_of = {conv: modules[bn.target] for bn, conv in bns.items()}
    g, env, layers, out = _Graph(), {}, [], None
    for node in traced.nodes:
        args = [env.get(a, a) if isinstance(a, fx.Node) else a for a in node.args]
        m = modules.get(node.target) if node.op == "call_module" else None
        if node.op == "placeholder":
            env[node] = INPUT
        elif node.op == "output":
            out = args[0]
        elif node in bns:
            env[node] = env[bns[node]]
        elif isinstance(m, (nn.Conv2d, nn.Linear)):
            env[node], info = _layer(g, len(layers), node.target, m, args[0], bn_of.get(node),
                                     accepted)
            layers.append(info)
        else:
            env[node] = _module_op(g, m, args[0]) if m is not None else (
                _function_op(g, node, args) if node.op in ("call_function", "call_method")
                else None)
            if env[node] is None:
                what = f"{type(m).__name__} ({node.target})" if m is not None else node.name
                raise QSearchError(f"cannot export {what} to ONNX: the exporter supports "
                                   f"{SUPPORTED}")
    if out == INPUT:
        g.nodes.append(helper.make_node("Identity", [out], [OUTPUT]))
    for n in g.nodes:  # the node that computes the output names it
        n.output[:] = [OUTPUT if o == out else o for o in n.output]
    return helper.make_graph(g.nodes, "qsearch", *_io(traced, modules), g.inits), layers


def _io(traced: fx.Graph, modules: dict[str, nn.Module]) -> tuple[list, list]:
    """Graph input ``[N, C, H, W]`` (C of the first layer) and output ``[N, K]`` (K of the
    layer that produces it, else symbolic)."""
    first = next(m for m in modules.values() if isinstance(m, (nn.Conv2d, nn.Linear)))
    cin = first.weight.shape[1] * getattr(first, "groups", 1)
    dims = ["N", cin, "H", "W"][:first.weight.dim()]
    src = next(n for n in traced.nodes if n.op == "output").args[0]
    last = modules.get(src.target) if getattr(src, "op", None) == "call_module" else None
    k = last.weight.shape[0] if isinstance(last, (nn.Conv2d, nn.Linear)) else "K"
    return ([helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, dims)],
            [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["N", k])])


def export_onnx(model: nn.Module, candidate_json: str, path: str | os.PathLike, *,
                spec_json: str | None = None) -> dict:
    """Write ``model`` (quantized with :func:`~qsearch.qlayers.quantize_model` and trained, or
    a float model) to ``path`` as ONNX; it computes the model's eval-mode forward.

    Metadata: ``qsearch_version``, ``candidate`` (verbatim) and ``spec`` when given. Returns
    the summary: ``total_bytes`` (file), ``weight_bytes`` (integer weight initializers),
    ``param_bytes`` (other initializers: scales, zero points, BatchNorm terms, biases, float
    weights, activation ranges), ``graph_bytes`` (nodes, names, metadata), ``c_size_bytes``
    (C_size/8 of the integer layers), ``opset``, ``layers`` (name, bits, ``stored_as``,
    ``weight_bytes``, ``note``) and ``notes`` (containers ONNX Runtime did not load).
    """
    path, _ = _check_export_args(model, candidate_json, path, [])
    graph, layers = build_graph(model, runtime_containers())
    opset = max([MIN_OPSET, *(info.pop("opset") for info in layers)])
    onnx_model = _model(graph, opset)
    meta = {"qsearch_version": __version__, "candidate": candidate_json}
    if spec_json is not None:
        meta["spec"] = spec_json
    helper.set_model_props(onnx_model, meta)
    onnx.checker.check_model(onnx_model, full_check=True)
    tmp = path.with_name(path.name + ".tmp")  # atomic: a reader never sees half a file
    onnx.save_model(onnx_model, str(tmp))
    os.replace(tmp, path)
    total = path.stat().st_size
    weight_bytes = sum(info["weight_bytes"] for info in layers)
    init_bytes = sum(len(t.SerializeToString()) for t in graph.initializer)
    c_size = sum(info["bits"] * model.get_submodule(info["name"]).weight.numel()
                 for info in layers if info["stored_as"] != "FLOAT")
    return {"path": str(path), "opset": opset, "total_bytes": total,
            "weight_bytes": weight_bytes, "param_bytes": init_bytes - weight_bytes,
            "graph_bytes": total - init_bytes, "c_size_bytes": c_size / 8, "layers": layers,
            "notes": sorted({info["note"] for info in layers if info["note"]})}


def session(path: str | os.PathLike, *, threads: int | None = None) -> ort.InferenceSession:
    """An ONNX Runtime session on the CPU execution provider."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or 0  # 0: ONNX Runtime's default
    return ort.InferenceSession(str(path), opts, providers=CPU)


@torch.no_grad()
def compare_with_torch(path: str | os.PathLike, model: nn.Module, batches, *,
                       threads: int | None = None) -> dict:
    """Run the exported file in ONNX Runtime and ``model`` (eval mode) on the same batches:
    ``agreement`` (share of equal top-1 predictions), ``max_logit_diff``, ``images``."""
    sess, was_training = session(path, threads=threads), model.training
    model.eval()
    same, n, diff = 0, 0, 0.0
    for x, *_ in batches:
        x = x.detach().cpu().float().contiguous()
        ref = model(x).numpy()
        got = sess.run([OUTPUT], {INPUT: x.numpy()})[0]
        same += int((ref.argmax(1) == got.argmax(1)).sum())
        n += len(x)
        diff = max(diff, float(np.abs(ref - got).max()))
    model.train(was_training)
    if n == 0:
        raise QSearchError("no images to compare the ONNX export on: the split is empty")
    return {"agreement": same / n, "max_logit_diff": diff, "images": n}


def format_summary(r: dict) -> str:
    """The export summary: file size, integer weight bytes against C_size/8, each layer."""
    ratio = r["weight_bytes"] / r["c_size_bytes"] if r["c_size_bytes"] else float("nan")
    file_ratio = r["total_bytes"] / r["c_size_bytes"] if r["c_size_bytes"] else float("nan")
    lines = [f"wrote {r['path']} (ONNX opset {r['opset']}): {r['total_bytes']:,} bytes = "
             f"integer weights {r['weight_bytes']:,} (C_size/8 = {r['c_size_bytes']:,.0f}, "
             f"{ratio:.4f}x) + scales, zero points, BatchNorm, biases and float weights "
             f"{r['param_bytes']:,} + graph and metadata {r['graph_bytes']:,}; file / "
             f"(C_size/8) = {file_ratio:.4f}",
             "layer                          bits  stored as  weight bytes"]
    lines += [f"{info['name']:<30} {info['bits'] if info['bits'] < 32 else 'float':>4}  "
              f"{info['stored_as']:<9}  {info['weight_bytes']:>12,}" for info in r["layers"]]
    lines += [f"note: {note}" for note in r["notes"]]
    return "\n".join(lines)


def export_checked(model: nn.Module, candidate_json: str, path: str | os.PathLike, test, *,
                   spec_json: str | None = None, threads: int | None = None) -> dict:
    """:func:`export_onnx`, then :func:`compare_with_torch` on ``test`` (a split with
    ``batches``): the summary plus ``agreement``, ``max_logit_diff`` and ``images``."""
    summary = export_onnx(model, candidate_json, path, spec_json=spec_json)
    check = compare_with_torch(summary["path"], model, test.batches(512), threads=threads)
    return {**summary, **check, "onnxruntime": ort.__version__}
