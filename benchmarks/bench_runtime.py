"""Runtime benchmark (ONNX Runtime, CPU): prefill time unpruned vs SparseVLM budgets, as
ratios measured side by side in one run next to the FLOPs ratios; decode time per token;
time in the pruning ops (TokenRecycle + TokenPrune function bodies) as a share of prefill.

    .venv/bin/python benchmarks/bench_runtime.py [--layers 18 --hidden 1024 --repeats 3]

The model is a random LLaVA-shaped checkpoint built in code (demo architecture widened).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import onnxruntime as ort
import torch

from sparsevlm.export import export
from sparsevlm.methods.demo_model import build_demo_model
from sparsevlm.runtime import Pipeline
from sparsevlm.runtime.backends import OnnxRuntimeExecutor

PROMPT = "Describe the picture in detail. What color is the large square and how many objects are there?"


def prune_op_share(artifact: Path, image, threads: int) -> tuple[float, float]:
    """(ms in pruning-op nodes, ms in all nodes) of the prefill segments, from ORT's profiler."""
    pipe = Pipeline.load(artifact, "onnxruntime", threads=threads)
    executor: OnnxRuntimeExecutor = pipe.executor
    profiled = {}
    for name in list(executor.sessions):
        if name.startswith("segment_"):
            options = ort.SessionOptions()
            options.enable_profiling = True
            options.intra_op_num_threads = threads
            options.profile_file_prefix = str(Path(tempfile.mkdtemp()) / name)
            executor.sessions[name] = ort.InferenceSession(str(pipe.artifact.graph_path(name)), options,
                                                           providers=["CPUExecutionProvider"])
            profiled[name] = executor.sessions[name]
    pipe.generate([image], [PROMPT], max_new_tokens=1)
    prune = total = 0.0
    for session in profiled.values():
        events = json.loads(Path(session.end_profiling()).read_text())
        for event in events:
            if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
                ms = event["dur"] / 1e3
                total += ms
                if "_inlfunc_Token" in event["name"] or "_inlfunc_TopK" in event["name"]:
                    prune += ms
    return prune, total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--layers", type=int, default=18)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--decode-tokens", type=int, default=16)
    args = p.parse_args()
    from PIL import Image
    image = Image.open(Path(__file__).resolve().parent.parent / "examples" / "shapes.png")
    work = Path(tempfile.mkdtemp(prefix="bench-runtime-"))
    model = build_demo_model(work / "model", num_layers=args.layers, hidden_size=args.hidden)
    settings = [("unpruned (576)", dict(method="none", budgets=None))] + \
        [(f"sparsevlm v1.5 {b}", dict(method="sparsevlm", budgets=[b])) for b in (192, 128, 64)]
    artifacts = {label: work / f"artifact-{i}" for i, (label, _) in enumerate(settings)}
    pipes = {}
    for label, kw in settings:
        t0 = time.perf_counter()
        export(str(model), artifacts[label], progress=False, **kw)
        print(f"exported {label} in {time.perf_counter() - t0:.1f} s")
        pipes[label] = Pipeline.load(artifacts[label], "onnxruntime", threads=args.threads)
    prefill = {label: [] for label in pipes}
    decode = {label: [] for label in pipes}
    flops = {}
    for _ in range(args.repeats):  # interleaved, so machine noise hits every setting alike
        for label, pipe in pipes.items():
            out = pipe.generate([image], [PROMPT], max_new_tokens=args.decode_tokens, stop_token_ids=[])
            prefill[label].append(out.timings["vision"] + out.timings["prefill"])
            decode[label].append(out.timings["decode"] / max(out.timings["decode_steps"] - 1, 1))
            flops[label] = out.accounting["rows"][0]["flops_ratio"]
    base = statistics.median(prefill["unpruned (576)"])
    print(f"\nLlama {args.layers} layers, hidden {args.hidden}; ONNX Runtime CPU, {args.threads} threads; "
          f"median of {args.repeats} interleaved runs")
    print(f"{'setting':<20} {'prefill ms':>11} {'time ratio':>11} {'FLOPs ratio':>12} {'decode ms/tok':>14}")
    for label in pipes:
        t = statistics.median(prefill[label])
        print(f"{label:<20} {t * 1e3:>11.1f} {t / base:>11.3f} {flops[label]:>12.3f} "
              f"{statistics.median(decode[label]) * 1e3:>14.1f}")
    for label, _ in settings[1:]:
        prune, total = prune_op_share(artifacts[label], image, args.threads)
        print(f"{label}: pruning ops {prune:.1f} ms of {total:.1f} ms segment kernel time ({100 * prune / total:.1f}%)")


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
