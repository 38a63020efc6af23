"""Where an ONNX Runtime prefill's time goes: per graph, the wall time of the executor's call
(`OnnxRuntimeExecutor._run`: feeds, session run, outputs) against ONNX Runtime's own run time
and the kernel time (from its profiler, `SessionOptions.enable_profiling`), kernel time by
kind (GEMMs, attention, the pruning ops' function bodies, the rest), and the generation
loop's host work between the calls (keep counts, the width rule, visual ids).

    .venv/bin/python benchmarks/profile_prefill.py ARTIFACT [--threads 2 --repeats 5]

`bench_speed.py --profile` prints the same for every setting it measures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

PROMPT = "Describe the picture in detail. What color is the large square and how many objects are there?"
IMAGE = Path(__file__).resolve().parent.parent / "examples" / "shapes.png"

# Kernel kinds by the node's op type or the function it was inlined from.
PRUNING_FUNCTIONS = ("_inlfunc_TokenRecycle", "_inlfunc_TokenPrune", "_inlfunc_TopKTokenSelect",
                     "_inlfunc_RankKeepCount")


def kernel_kind(event: dict) -> str:
    name, op = event["name"], event.get("args", {}).get("op_name", "")
    if any(function in name for function in PRUNING_FUNCTIONS):
        return "pruning ops"
    if op in ("MatMul", "Gemm", "FusedMatMul", "MatMulNBits"):
        return "GEMM"
    if op in ("Softmax",) or "Attention" in op:
        return "softmax/attention"
    return "other"


def profiled_sessions(executor, threads: int) -> dict:
    """Swap each session of `executor` for one with ONNX Runtime's profiler on (same options)."""
    import onnxruntime as ort
    folder = Path(tempfile.mkdtemp(prefix="ort-profile-"))
    profiled = {}
    for name in list(executor.sessions):
        options = executor.session_options(name)
        options.enable_profiling = True
        options.profile_file_prefix = str(folder / name)
        executor.sessions[name] = ort.InferenceSession(str(executor.artifact.graph_path(name)), options,
                                                       providers=executor.sessions[name].get_providers())
        profiled[name] = executor.sessions[name]
    executor.refresh_bindings()
    return profiled


def breakdown(pipe, prepared: dict, threads: int, repeats: int = 5) -> dict:
    """Median per-run milliseconds: {"prefill": ms, "host between calls": ms, graph: {...}}."""
    executor = pipe.executor
    originals = dict(executor.sessions)
    profiled = profiled_sessions(executor, threads)
    walls, segment_walls = defaultdict(list), [0.0]  # per graph; per run, the segment calls' sum
    run = executor._run

    def timed_run(name, inputs):
        t0 = time.perf_counter()
        out = run(name, inputs)
        walls[name].append(time.perf_counter() - t0)
        if name.startswith("segment_"):
            segment_walls[-1] += walls[name][-1]
        return out

    executor._run = timed_run
    prefill = []
    try:
        pipe.generate_prepared([prepared], max_new_tokens=1, stop_token_ids=[])  # warm-up (profiled too)
        for values in walls.values():
            values.clear()
        host = []
        for _ in range(repeats):
            segment_walls.append(0.0)
            out = pipe.generate_prepared([prepared], max_new_tokens=1, stop_token_ids=[])
            prefill.append(out.timings["prefill"])
            host.append(out.timings["prefill"] - segment_walls[-1])
    finally:
        del executor._run
        executor.sessions.update(originals)
        executor.refresh_bindings()
    result = {"prefill": statistics.median(prefill) * 1e3, "host between calls": statistics.median(host) * 1e3}
    for name, session in profiled.items():
        if not walls[name]:
            continue
        events = json.loads(Path(session.end_profiling()).read_text())
        runs = [e["dur"] / 1e3 for e in events if e.get("cat") == "Session" and e["name"] == "model_run"][1:]
        kinds = defaultdict(float)
        for event in events:
            if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
                kinds[kernel_kind(event)] += event["dur"] / 1e3
        calls = len(runs) + 1  # the warm-up's run is in the kernel sums too
        wall = statistics.median(walls[name]) * 1e3
        result[name] = {"call": wall, "session run": statistics.median(runs) if runs else float("nan"),
                        **{kind: ms / calls for kind, ms in sorted(kinds.items())}}
    return result


def print_breakdown(pipe, prepared: dict, label: str, threads: int, repeats: int = 5) -> dict:
    result = breakdown(pipe, prepared, threads, repeats)
    print(f"\n{label}: prefill {result['prefill']:.1f} ms (median of {repeats}); host work between segment calls "
          f"{result['host between calls']:.1f} ms")
    for name, parts in result.items():
        if isinstance(parts, dict):
            detail = ", ".join(f"{kind} {ms:.1f}" for kind, ms in parts.items())
            print(f"  {name}: {detail} (ms)")
    return result


def main() -> None:
    import torch

    from sparsevlm.runtime import Pipeline
    from sparsevlm.runtime.artifact import Artifact
    from sparsevlm.runtime.backends import OnnxRuntimeExecutor, graph_names
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("artifact")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    artifact = Artifact.load(args.artifact)
    graphs = [name for name in graph_names(artifact) if name != "decode"]  # prefill only
    pipe = Pipeline(artifact, OnnxRuntimeExecutor(artifact, threads=args.threads, graphs=graphs), "onnxruntime")
    prepared = pipe.prepare([IMAGE], [PROMPT], max_new_tokens=1)
    print_breakdown(pipe, prepared, args.artifact, args.threads, args.repeats)


if __name__ == "__main__":
    main()
