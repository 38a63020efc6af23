"""Optimization profiles for a dynamic length: at most N buckets [min, opt, max] over the
observed lengths that serve at least a target fraction of them with the least padding.

Cost model: the runtime's rule (`sparsevlm.methods.profiles.select_profile`, which
`serving_cost` calls): a length W runs in the containing profile with the smallest `max`, or,
below every containing profile, padded up to the nearest larger profile's `min`; a length
above every `max` cannot run. A profile is costed as if its engine ran at its `max`, so a
sample of length w served by a profile with maximum M pays M - w padding tokens.

Why dropping only from the top is optimal. Under that model a sample's cost depends only on
the set of maxima: it pays (smallest max >= w) - w, whatever the mins, and it is uncovered
only when it is above the largest max. So
  * leaving a sample in the middle or at the bottom "uncovered" saves nothing: the runtime
    pads it into the next profile at exactly the cost of that profile reaching down to it;
  * for a top T (the largest max), the best cost over the lengths <= T never decreases as T
    grows: restricting a solution for T' > T to the lengths <= T and lowering its top max to
    T lowers every remaining sample's cost.
Hence the optimum serves exactly the shortest prefix of the sorted lengths that reaches the
coverage target, split into at most N contiguous runs, each with its max at its largest
length: an exact dynamic program over the sorted distinct lengths with counts.
`tests/test_calibration_buckets.py` checks it against a brute force over every set of
disjoint intervals (gaps and dropped extremes included) under the same runtime model.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Iterable

from sparsevlm.methods import profiles as profile_contract


@dataclass(frozen=True)
class Bucket:
    min: int
    opt: int
    max: int

    def as_list(self) -> list[int]:
        return [self.min, self.opt, self.max]


@dataclass(frozen=True)
class BucketPlan:
    """Chosen buckets and what they cost on the samples they were chosen from."""

    buckets: list[Bucket]
    num_samples: int
    covered: int  # samples whose length is <= the largest max (they can run)
    padding_tokens: int  # total over covered samples of (serving bucket max - length)
    covered_tokens: int  # total length of the covered samples

    @property
    def coverage(self) -> float:
        return self.covered / self.num_samples

    @property
    def expected_padding(self) -> float:
        """Padding as a fraction of the real tokens: E[max - w] / E[w] over covered samples."""
        return self.padding_tokens / self.covered_tokens if self.covered_tokens else 0.0

    @property
    def mean_padding(self) -> float:
        return self.padding_tokens / self.covered


def required_count(num_samples: int, coverage: float) -> int:
    """Fewest samples that reach `coverage` (a small tolerance keeps 0.995 * 200 at 199)."""
    return max(1, math.ceil(coverage * num_samples - 1e-9))


def _check_arguments(lengths: list[int], max_buckets: int, coverage: float) -> None:
    if not lengths:
        raise ValueError("lengths: expected at least one sample length, got none")
    if any(not isinstance(w, int) or w < 0 for w in lengths):
        raise ValueError("lengths: expected non-negative integers")
    if not isinstance(max_buckets, int) or max_buckets < 1:
        raise ValueError(f"max_profiles: expected a positive integer, got {max_buckets!r}")
    if not 0.0 < coverage <= 1.0:
        raise ValueError(f"coverage: expected a fraction in (0, 1], got {coverage!r}")


def _run_costs(values: list[int], counts: list[int]):
    """cost(j, i): padding of the run values[j..i] (inclusive) served at max values[i]."""
    count_prefix, sum_prefix = [0], [0]
    for v, c in zip(values, counts):
        count_prefix.append(count_prefix[-1] + c)
        sum_prefix.append(sum_prefix[-1] + v * c)

    def cost(j: int, i: int) -> int:
        return values[i] * (count_prefix[i + 1] - count_prefix[j]) - (sum_prefix[i + 1] - sum_prefix[j])

    return cost, count_prefix


def _best_runs(cost, top: int, max_buckets: int) -> list[tuple[int, int]]:
    """Split the sorted distinct values 0..top into at most `max_buckets` contiguous runs
    with the least total padding `cost(j, i)`; among equal costs, the fewest runs (fewer
    engines to build)."""
    size = top + 1
    inf = math.inf
    # best[k][i]: least padding of values[0..i-1] in exactly k runs; cut[k][i]: start of the last run
    best = [[inf] * (size + 1) for _ in range(max_buckets + 1)]
    cut = [[0] * (size + 1) for _ in range(max_buckets + 1)]
    best[0][0] = 0
    for k in range(1, max_buckets + 1):
        for i in range(1, size + 1):
            for j in range(k - 1, i):
                if best[k - 1][j] == inf:
                    continue
                candidate = best[k - 1][j] + cost(j, i - 1)
                if candidate < best[k][i]:
                    best[k][i], cut[k][i] = candidate, j
    runs_used = min(range(1, max_buckets + 1), key=lambda k: (best[k][size], k))
    runs, end = [], size
    for k in range(runs_used, 0, -1):
        start = cut[k][end]
        runs.append((start, end - 1))
        end = start
    return runs[::-1]


def _median(values: list[int], counts: list[int]) -> int:
    """Lower weighted median: the length at the middle sample of the run."""
    middle = (sum(counts) - 1) // 2
    seen = 0
    for v, c in zip(values, counts):
        seen += c
        if seen > middle:
            return v
    raise AssertionError("unreachable: the run is not empty")


def choose_buckets(lengths: Iterable[int], max_buckets: int = 4, coverage: float = 0.995) -> BucketPlan:
    """At most `max_buckets` profiles serving >= `coverage` of `lengths` with least padding.

    Bucket i's min is the previous bucket's max + 1 (the first keeps the smallest observed
    length), so every length between the smallest and the largest max has a containing
    profile and unseen lengths in a gap need no padding up; the cost is unchanged since it
    depends only on the maxima. opt is the bucket's median length, where TensorRT tunes.
    """
    lengths = list(lengths)
    _check_arguments(lengths, max_buckets, coverage)
    histogram = sorted(Counter(lengths).items())
    values = [v for v, _ in histogram]
    counts = [c for _, c in histogram]
    cost, count_prefix = _run_costs(values, counts)
    needed = required_count(len(lengths), coverage)
    top = next(i for i in range(len(values)) if count_prefix[i + 1] >= needed)
    runs = _best_runs(cost, top, max_buckets)
    buckets, previous_max = [], None
    for start, stop in runs:
        low = values[start] if previous_max is None else previous_max + 1
        buckets.append(Bucket(low, _median(values[start:stop + 1], counts[start:stop + 1]), values[stop]))
        previous_max = values[stop]
    covered = count_prefix[top + 1]
    padding = sum(cost(start, stop) for start, stop in runs)
    covered_tokens = sum(v * c for v, c in zip(values[:top + 1], counts[:top + 1]))
    return BucketPlan(buckets, len(lengths), covered, padding, covered_tokens)


def serving_cost(buckets: list[Bucket], length: int) -> int | None:
    """Padding the runtime pays for `length` with these profiles (None: it cannot run):
    priced with the runtime's own rule (sparsevlm.methods.profiles.serving_cost)."""
    return profile_contract.serving_cost([(b.min, b.opt, b.max) for b in buckets], length)
