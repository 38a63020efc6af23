"""The profile-bucket optimiser against a brute force over every set of profiles.

The brute force knows nothing of the optimiser's reduction (serve a prefix of the sorted
lengths, split it into contiguous runs): it tries every collection of at most N disjoint
intervals over the observed lengths, gaps and dropped extremes included, and prices each
sample the way docs/interfaces.md says the runtime serves it (a containing profile, else the
nearest larger one after padding up to its min, else it cannot run). Endpoints at observed
lengths are enough: a max above the largest length it serves only adds padding, and a min
between observed lengths serves the same samples as the next observed length.
"""

import itertools
import math
import random
import statistics

import pytest

from sparsevlm.calibration.buckets import Bucket, choose_buckets, serving_cost
from sparsevlm.methods.profiles import ProfileError, SegmentProfiles


def runtime_padding(intervals, length):
    """Independent statement of the runtime's contract (None: the length cannot run)."""
    for low, high in intervals:
        if low <= length <= high:
            return high - length
    above = [(low, high) for low, high in intervals if low > length]
    if above:
        return min(above)[1] - length
    return None


def evaluate(intervals, lengths):
    costs = [runtime_padding(intervals, w) for w in lengths]
    served = [c for c in costs if c is not None]
    return len(served), sum(served)


def brute_force(lengths, max_buckets, coverage):
    """Least total padding over all collections of <= max_buckets disjoint intervals that
    serve at least `coverage` of the samples."""
    values = sorted(set(lengths))
    intervals = [(a, b) for a in values for b in values if a <= b]
    needed = math.ceil(coverage * len(lengths) - 1e-9)
    best = math.inf
    for count in range(1, max_buckets + 1):
        for chosen in itertools.combinations(intervals, count):
            ordered = sorted(chosen)
            if any(prev[1] >= nxt[0] for prev, nxt in zip(ordered, ordered[1:])):
                continue  # overlapping profiles
            served, padding = evaluate(ordered, lengths)
            if served >= needed:
                best = min(best, padding)
    return best


def as_intervals(plan):
    return [(b.min, b.max) for b in plan.buckets]


@pytest.mark.parametrize("seed", range(150))
def test_matches_brute_force_on_random_sets(seed):
    rng = random.Random(seed)
    spread = rng.choice([3, 8, 20])
    lengths = [rng.randrange(spread) + rng.choice([0, 0, 5 * spread]) for _ in range(rng.randrange(1, 13))]
    max_buckets = rng.randrange(1, 4)
    coverage = rng.choice([0.5, 0.75, 0.9, 0.995, 1.0])

    plan = choose_buckets(lengths, max_buckets, coverage)

    served, padding = evaluate(as_intervals(plan), lengths)
    assert padding == plan.padding_tokens == brute_force(lengths, max_buckets, coverage)
    assert served == plan.covered >= math.ceil(coverage * len(lengths) - 1e-9)
    assert len(plan.buckets) <= max_buckets


@pytest.mark.parametrize("seed", range(40))
def test_buckets_are_well_formed(seed):
    rng = random.Random(1000 + seed)
    lengths = [rng.randrange(5, 120) for _ in range(rng.randrange(1, 60))]
    plan = choose_buckets(lengths, rng.randrange(1, 6), rng.choice([0.8, 0.95, 1.0]))
    for previous, bucket in zip(plan.buckets, plan.buckets[1:]):
        assert bucket.min == previous.max + 1  # they tile: no unseen length between them needs padding up
    assert plan.buckets[0].min == min(lengths)
    for bucket in plan.buckets:
        members = sorted(w for w in lengths if bucket.min <= w <= bucket.max)
        assert bucket.max == members[-1]  # a max above every member would only add padding
        assert bucket.opt == members[(len(members) - 1) // 2]  # the (lower) median member
    covered = [w for w in lengths if w <= plan.buckets[-1].max]
    assert plan.coverage == len(covered) / len(lengths)
    assert plan.expected_padding == pytest.approx(plan.padding_tokens / sum(covered))


def test_more_profiles_never_cost_more():
    rng = random.Random(7)
    lengths = [rng.randrange(20, 300) for _ in range(400)]
    costs = [choose_buckets(lengths, n, 0.995).padding_tokens for n in range(1, 7)]
    assert costs == sorted(costs, reverse=True) and costs[-1] < costs[0]


def test_coverage_drops_the_rare_long_tail():
    lengths = [40] * 150 + [41] * 49 + [500]  # 199 of 200 = 0.995
    plan = choose_buckets(lengths, max_buckets=2, coverage=0.995)
    assert [b.as_list() for b in plan.buckets] == [[40, 40, 40], [41, 41, 41]]
    assert plan.coverage == 0.995 and plan.padding_tokens == 0
    full = choose_buckets(lengths, max_buckets=2, coverage=1.0)
    assert full.buckets[-1].max == 500 and full.coverage == 1.0


def test_one_profile_spans_the_served_range():
    lengths = [10, 12, 12, 30, 31]
    plan = choose_buckets(lengths, max_buckets=1, coverage=1.0)
    assert [b.as_list() for b in plan.buckets] == [[10, 12, 31]]
    assert plan.padding_tokens == sum(31 - w for w in lengths)


@pytest.mark.parametrize("lengths", [[64], [64] * 9])
def test_single_sample_and_all_equal(lengths):
    plan = choose_buckets(lengths, max_buckets=4, coverage=0.995)
    assert [b.as_list() for b in plan.buckets] == [[64, 64, 64]]
    assert plan.coverage == 1.0 and plan.expected_padding == 0.0


def test_equal_cost_prefers_fewer_profiles():
    # two profiles cannot beat one here: [5, 5] costs 0 with one profile already
    plan = choose_buckets([5, 5, 5], max_buckets=3, coverage=1.0)
    assert len(plan.buckets) == 1


def test_opt_is_the_median_of_a_bucket():
    plan = choose_buckets([1, 2, 2, 2, 9], max_buckets=1, coverage=1.0)
    assert plan.buckets[0].opt == statistics.median_low([1, 2, 2, 2, 9])


@pytest.mark.parametrize("lengths, max_buckets, coverage, message", [
    ([], 2, 0.9, "at least one"),
    ([3, 4], 0, 0.9, "max_profiles"),
    ([3, 4], 2, 0.0, "coverage"),
    ([3, 4], 2, 1.5, "coverage"),
    ([3, -1], 2, 0.9, "non-negative"),
])
def test_bad_arguments(lengths, max_buckets, coverage, message):
    with pytest.raises(ValueError, match=message):
        choose_buckets(lengths, max_buckets, coverage)


# The runtime's profile rule and calibration's price are one function (sparsevlm.methods.profiles).

OVERLAPPING = [[(1, 50, 100), (1, 20, 40)], [(10, 15, 20), (30, 40, 50), (60, 60, 60)],
               [(60, 60, 60), (30, 40, 50), (10, 15, 20)], [(5, 9, 30), (5, 6, 30), (20, 25, 90)],
               [(20, 30, 90), (20, 25, 40), (50, 60, 60)]]


def test_overlapping_profiles_hand_case():
    """Width 30 in [(1, 50, 100), (1, 20, 40)]: the runtime runs profile 1 (the smaller max,
    not the first containing one) and calibration prices exactly that: 40 - 30."""
    policy = SegmentProfiles({1: [(1, 50, 100), (1, 20, 40)]})
    assert policy.choose(1, 30).profile == 1
    assert serving_cost([Bucket(1, 50, 100), Bucket(1, 20, 40)], 30) == 10
    assert policy.choose(1, 41).profile == 0 and serving_cost([Bucket(1, 50, 100), Bucket(1, 20, 40)], 41) == 59


@pytest.mark.parametrize("profiles", OVERLAPPING)
def test_calibration_prices_the_profile_the_runtime_runs(profiles):
    policy = SegmentProfiles({1: profiles})
    buckets = [Bucket(*p) for p in profiles]
    for width in range(0, max(high for _, _, high in profiles) + 3):
        containing = [p for p in profiles if p[0] <= width <= p[2]]
        larger = [p for p in profiles if p[0] > width]
        if not containing and not larger:
            with pytest.raises(ProfileError):
                policy.choose(1, width)
            assert serving_cost(buckets, width) is None
            continue
        choice = policy.choose(1, width)
        assert serving_cost(buckets, width) == choice.bounds[2] - width
        # brute force: the cheapest containing profile, else the cheapest of those starting nearest above
        pool = containing or [p for p in larger if p[0] == min(q[0] for q in larger)]
        assert choice.bounds[2] == min(p[2] for p in pool), width


@pytest.mark.parametrize("seed", range(30))
def test_chosen_buckets_cost_what_the_runtime_rule_pays(seed):
    """The padding the bucket choice reports is what the runtime's rule charges its samples."""
    rng = random.Random(5000 + seed)
    lengths = [rng.randrange(1, 60) for _ in range(rng.randrange(1, 40))]
    plan = choose_buckets(lengths, rng.randrange(1, 5), rng.choice([0.8, 0.995, 1.0]))
    costs = [serving_cost(plan.buckets, w) for w in lengths]
    assert sum(c for c in costs if c is not None) == plan.padding_tokens
    assert sum(c is not None for c in costs) == plan.covered
