"""ONNX export: file size against C_size/8, and ONNX Runtime CPU latency against the float model.

For ResNet-20 at 32KB and MobileNetV2-CIFAR at 256KB (Fashion-MNIST, 1x28x28, the project's
default dataset), three width-aligned candidates each: uniform 2-bit, uniform 4-bit and mixed
1/2/4/8-bit free layers (first and last layer pinned at 8 bits, 4-bit activations). Each is
trained for a few QAT steps (accuracy is not the point: sizes and latency do not depend on
it), exported with ``qsearch.onnx_export.export_onnx`` and checked against PyTorch on 1,000
test images. The float model of the same architecture and width is exported the same way.

Columns: the file over C_size/8 (target <= 1.10 where INT2/INT4 are accepted), the integer
weight initializers over C_size/8, the rest of the file split into float parameters (scales,
zero points, BatchNorm terms, biases, activation ranges) and graph (nodes, names,
metadata), qsearch's own packed safetensors file for comparison, and ONNX Runtime's median
CPU latency per image at batch 1 and per image at batch 64, quantized over float (timed
round by round, interleaved). The last lines count the operators ONNX Runtime actually runs
after its graph optimizations.

    python benchmarks/bench_onnx.py [--steps 30] [--threads 1]
"""

from __future__ import annotations

import argparse
import collections
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from qsearch.budget import parse_budget
from qsearch.data import load_dataset
from qsearch.export import export_model
from qsearch.onnx_export import compare_with_torch, export_onnx, session
from qsearch.qlayers import quantize_model
from qsearch.space import SearchSpace
from qsearch.train import TrainConfig, train

SETTINGS = (("resnet20", "32KB"), ("mobilenetv2-cifar", "256KB"))
CANDIDATES = {"2-bit": 2, "4-bit": 4, "mixed 1/2/4/8": (1, 2, 4, 8)}


def candidate(space: SearchSpace, bits, budget: str):
    if isinstance(bits, tuple):
        bits = [bits[i % len(bits)] for i in range(len(space.free_layers))]
    return space.align(space.candidate(bits), parse_budget(budget)).candidate


def latency_ms(paths: dict[str, Path], shape: tuple, batch: int, threads: int,
               rounds: int = 20) -> dict[str, float]:
    """Median ms per image of ``sess.run`` on random input, for each file; the files are timed
    round by round (q, f, q, f, ...), so load on the machine hits them alike."""
    sessions = {k: session(path, threads=threads) for k, path in paths.items()}
    x = np.random.default_rng(0).standard_normal((batch, *shape)).astype(np.float32)
    reps = max(1, 16 // batch)
    times: dict[str, list[float]] = {k: [] for k in paths}
    for _ in range(rounds + 1):
        for k, sess in sessions.items():
            t = time.perf_counter()
            for _ in range(reps):
                sess.run(None, {"input": x})
            times[k].append((time.perf_counter() - t) / reps)
    return {k: 1e3 * statistics.median(v[1:]) / batch for k, v in times.items()}  # v[0]: warm-up


def ops_run(path: Path, out: Path) -> collections.Counter:
    """Operator counts of the graph ONNX Runtime runs (after its optimizations)."""
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(out)
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return collections.Counter(n.op_type for n in onnx.load(str(out)).graph.node)


def one(space, cand, splits, tmp: Path, args) -> dict:
    model = quantize_model(space.build(cand), space.layer_bits(cand), cand.a_bits)
    train(model, splits, TrainConfig(steps=args.steps, batch_size=64, eval_every_steps=10**6))
    model.eval()
    q = export_onnx(model, cand.to_json(), tmp / "q.onnx")
    st = export_model(model, cand.to_json(), tmp / "q.safetensors",
                      layer_names=[l.name for l in space.layers])
    f = export_onnx(space.build(cand).eval(), cand.to_json(), tmp / "f.onnx")
    check = compare_with_torch(q["path"], model, splits.test.batches(500), threads=args.threads)
    shape = (space.info.in_channels, space.info.image_size, space.info.image_size)
    paths = {"q": tmp / "q.onnx", "f": tmp / "f.onnx"}
    lat = {(k, b): ms for b in (1, 64)
           for k, ms in latency_ms(paths, shape, b, args.threads).items()}
    return {"q": q, "st": st, "f": f, "check": check, "lat": lat,
            "ops": ops_run(tmp / "q.onnx", tmp / "q.opt.onnx"),
            "float_ops": ops_run(tmp / "f.onnx", tmp / "f.opt.onnx")}


def report(name: str, r: dict) -> None:
    q, c = r["q"], r["q"]["c_size_bytes"]
    lat = r["lat"]
    stored = collections.Counter(info["stored_as"] for info in q["layers"])
    print(f"{name:<32} {q['total_bytes']:>9,} {c:>9,.0f} {q['total_bytes'] / c:>6.3f} "
          f"{q['weight_bytes'] / c:>7.3f} {q['param_bytes'] / c:>6.3f} "
          f"{q['graph_bytes'] / c:>6.3f} "
          f"{r['st']['total_bytes'] / c:>6.3f} {lat['q', 1]:>7.3f} {lat['f', 1]:>7.3f} "
          f"{lat['q', 1] / lat['f', 1]:>5.2f} {lat['q', 64] / lat['f', 64]:>5.2f} "
          f"{r['check']['agreement']:>7.2%} {r['check']['max_logit_diff']:>8.2g}  "
          + " ".join(f"{k}x{v}" for k, v in sorted(stored.items())))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30, help="QAT steps per candidate")
    p.add_argument("--threads", type=int, default=1, help="torch and ONNX Runtime threads")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    ort.set_default_logger_severity(3)  # not the warning on saving an optimized model
    splits = load_dataset("fashion-mnist", train_fraction=0.2)
    splits.test.images, splits.test.labels = splits.test.images[:1000], splits.test.labels[:1000]
    print(f"onnxruntime {ort.__version__}, onnx {onnx.__version__}, torch {torch.__version__}, "
          f"{args.threads} thread(s), {args.steps} QAT steps per candidate; latency = median "
          "ms per image, q = quantized export, f = float export")
    print(f"{'model / budget / bits':<32} {'file B':>9} {'C_size/8':>9} {'file/C':>6} "
          f"{'weights':>7} {'params':>6} {'graph':>6} {'st/C':>6} {'q b=1':>7} {'f b=1':>7} "
          f"{'q/f 1':>5} {'q/f64':>5} {'agree':>7} {'max|dl|':>8}  stored as (layers)")
    last = None
    with tempfile.TemporaryDirectory() as tmp:
        for model_name, budget in SETTINGS:
            space = SearchSpace(model_name, "fashion-mnist")
            for label, bits in CANDIDATES.items():
                last = one(space, candidate(space, bits, budget), splits, Path(tmp), args)
                report(f"{model_name} {budget} {label}", last)
    print("ops ONNX Runtime runs, last quantized export:", dict(last["ops"]))
    print("ops ONNX Runtime runs, its float export:     ", dict(last["float_ops"]))


if __name__ == "__main__":
    main()
