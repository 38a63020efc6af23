"""Decode benchmark: ms per generated token from token 1 to token N (default 256), for the
unpruned export and SparseVLM v1.5 budget 64 of the same random LLaVA, on the ONNX Runtime
and torch backends, side by side in one run.

    .venv/bin/python benchmarks/bench_decode.py [--layers 18 --hidden 1024 --tokens 256 --threads 2]

Token 0 comes from the prefill logits; token t >= 1 costs one decode step (the decode graph
through every layer, then the cache update). Each step is timed alone; the table gives the
mean over windows near the start, the middle and the end of the answer, and the ratio of
the last window to the first (1.0: the time per token does not grow with the answer). Each
(artifact, backend) runs `--repeats` times and the per-step median is taken; one pipeline
is loaded at a time (the 18-layer model holds about 1.5 GB per loaded backend).
`--clock cpu` times the process's CPU time instead of wall time: on a machine shared with
other jobs it measures the work of each step without the waits for a core (use it with
`--threads 1`, where it equals the compute time).
Greedy decoding with no stop token, batch 1. The model is a random LLaVA-shaped checkpoint
built in code (demo architecture widened), as in bench_runtime.py.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import time
from pathlib import Path

import torch

from sparsevlm.export import export
from sparsevlm.methods import generation
from sparsevlm.methods.demo_model import build_demo_model
from sparsevlm.methods.segments import plan_segments
from sparsevlm.runtime import Pipeline

PROMPT = "Describe the picture in detail. What color is the large square and how many objects are there?"
SETTINGS = {"unpruned (576)": dict(method="none", budgets=None),
            "sparsevlm v1.5 64": dict(method="sparsevlm", variant="v1.5", budgets=[64])}


def windows(tokens: int) -> list[tuple[int, int]]:
    """Token windows (inclusive) at the start, middle and end of `tokens` decode steps."""
    width = max(1, min(16, tokens // 8))
    middle = tokens // 2 - width // 2
    return [(1, width), (middle, middle + width - 1), (tokens - width + 1, tokens)]


def step_times(pipe: Pipeline, image, tokens: int, clock=time.perf_counter) -> list[float]:
    """Seconds of decode steps 1..tokens (index t - 1) of one greedy batch-1 generation."""
    prepared = pipe.prepare([image], [PROMPT], tokens + 1)
    plan = pipe.artifact.plan
    batch = generation.make_region_batch(prepared["input_ids"], pipe.spec.image_token_id, plan.num_visual,
                                         pipe.spec.pad_token_id)
    result = generation.prefill(pipe.executor, plan, batch, prepared["pixel_values"], pipe.profile_policy.choose)
    params = generation.SamplingParams(max_new_tokens=tokens + 1, stop_token_ids=())
    steps = generation.decode_tokens(pipe.executor, plan_segments(plan), result, params, pipe.spec.pad_token_id)
    next(steps)  # token 0: from the prefill logits
    times = []
    while True:
        start = clock()
        try:
            next(steps)
        except StopIteration:
            break
        times.append(clock() - start)
    assert len(times) == tokens, len(times)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=18)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--backends", nargs="+", default=["onnxruntime", "torch"], choices=["onnxruntime", "torch"])
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    p.add_argument("--work", help="folder for the model and artifacts (reused when present)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from PIL import Image
    image = Image.open(Path(__file__).resolve().parent.parent / "examples" / "shapes.png")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench-decode-"))
    model_dir = work / "model"
    if not (model_dir / "config.json").exists():
        build_demo_model(model_dir, num_layers=args.layers, hidden_size=args.hidden)
    artifacts = {}
    for index, (label, kwargs) in enumerate(SETTINGS.items()):
        artifacts[label] = work / f"artifact-{index}"
        if not (artifacts[label] / "manifest.json").exists():
            t0 = time.perf_counter()
            export(str(model_dir), artifacts[label], progress=False, **kwargs)
            print(f"exported {label} in {time.perf_counter() - t0:.1f} s", flush=True)

    spans = windows(args.tokens)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    results = {}
    for backend in args.backends:
        for label, path in artifacts.items():
            pipe = Pipeline.load(path, backend, threads=args.threads)
            step_times(pipe, image, 4, clock)  # warm-up (first-call allocations, lazy initialisation)
            runs = [step_times(pipe, image, args.tokens, clock) for _ in range(args.repeats)]
            per_step = [statistics.median(times) for times in zip(*runs)]
            results[(label, backend)] = [statistics.mean(per_step[lo - 1:hi]) for lo, hi in spans]
            print(f"{label}, {backend}: " + ", ".join(f"tokens {lo}-{hi} {m * 1e3:.2f} ms" for (lo, hi), m
                                                       in zip(spans, results[(label, backend)])), flush=True)
            del pipe
            gc.collect()

    print(f"\nLlama {args.layers} layers, hidden {args.hidden}; batch 1, greedy, {args.tokens} new tokens; "
          f"{args.threads} threads; {args.clock} time, per-step median of {args.repeats} runs")
    header = "".join(f"{f'tok {lo}-{hi}':>13}" for lo, hi in spans)
    print(f"{'setting':<20} {'backend':<12}{header} {'last/first':>11}   (decode ms/token)")
    for (label, backend), means in results.items():
        cells = "".join(f"{m * 1e3:>13.2f}" for m in means)
        print(f"{label:<20} {backend:<12}{cells} {means[-1] / means[0]:>11.3f}")
    for backend in args.backends:
        pruned, full = results[("sparsevlm v1.5 64", backend)], results[("unpruned (576)", backend)]
        ratios = " / ".join(f"{p / f:.3f}" for p, f in zip(pruned, full))
        print(f"{backend}: budget 64 / unpruned per window: {ratios}")


if __name__ == "__main__":
    main()
