"""Calibration on the demo model: throughput, keep-count spread per pruning layer, and the
expected padding of the chosen profiles for N = 1, 2, 4.

    python benchmarks/bench_calibration.py --samples 300
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from sparsevlm.calibration import calibrate, choose_buckets, synthetic_samples
from sparsevlm.methods import SparseLlava, SparseVLMConfig
from sparsevlm.methods.demo_model import build_demo_model


def percentile(values: list[int], fraction: float) -> int:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def print_spread(records: list[dict]) -> None:
    print("\nkeep-count spread per pruning layer")
    print(f"{'layer':>5} {'min':>5} {'p5':>5} {'median':>7} {'p95':>5} {'max':>5} {'distinct':>8} "
          f"{'rank min..max':>14}")
    for position, layer in enumerate(records[0]["layers"]):
        keeps = [r["layers"][position]["keep_count"] for r in records]
        ranks = [r["layers"][position]["rank"] for r in records if r["layers"][position]["rank"] is not None]
        rank_range = f"{min(ranks)}..{max(ranks)}" if ranks else "-"
        print(f"{layer['layer']:>5} {min(keeps):>5} {percentile(keeps, 0.05):>5} {statistics.median(keeps):>7g} "
              f"{percentile(keeps, 0.95):>5} {max(keeps):>5} {len(set(keeps)):>8} {rank_range:>14}")


def print_padding(records: list[dict], coverage: float, profile_counts=(1, 2, 4)) -> None:
    print(f"\nexpected padding of the chosen profiles (coverage target {coverage})")
    print(f"{'segment':>7} {'after':>5} " + " ".join(f"{f'N={n}':>24}" for n in profile_counts))
    for index in range(1, len(records[0]["segments"])):
        widths = [r["segments"][index]["visual_width"] for r in records]
        cells = []
        for n in profile_counts:
            plan = choose_buckets(widths, n, coverage)
            cells.append(f"{plan.expected_padding:>7.1%} ({plan.mean_padding:5.1f} tok, cov {plan.coverage:.3f})")
        print(f"{index:>7} {records[0]['segments'][index]['after_layer']:>5} " + " ".join(f"{c:>24}" for c in cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--budget", type=int, default=192, help="v1.0 preset (scale, bias) unless given")
    parser.add_argument("--scale", type=float)
    parser.add_argument("--bias", type=float)
    parser.add_argument("--coverage", type=float, default=0.995)
    args = parser.parse_args()

    config = SparseVLMConfig(method="sparsevlm", variant="v1.0", budget=args.budget, scale=args.scale, bias=args.bias)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_demo_model(Path(tmp) / "demo")
        vlm = SparseLlava.from_pretrained(str(model_dir), config)
        samples = synthetic_samples(args.samples)
        start, cpu_start = time.perf_counter(), time.process_time()
        result = calibrate(vlm, config, samples, Path(tmp) / "out", max_profiles=4, coverage=args.coverage,
                           batch_size=args.batch_size, report=False)
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    plan = vlm.plan
    print(f"\ndemo model, sparsevlm v1.0 scale={plan.scale} bias={plan.bias}, {args.samples} synthetic samples, "
          f"batch {args.batch_size}")
    # the CPU time shows the cost when the machine is shared (wall-clock throughput then drops)
    print(f"calibration throughput: {args.samples / elapsed:.2f} samples/s ({elapsed:.1f} s wall, "
          f"{cpu:.1f} s CPU over all threads, profiles included)")
    print_spread(result.records)
    print_padding(result.records, args.coverage)


if __name__ == "__main__":
    main()
