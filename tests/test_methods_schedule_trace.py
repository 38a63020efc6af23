"""SparseVLM v1.5's schedule and token accounting against docs/accounting.md, the rank rules'
skip case end to end, and the trace JSON against docs/trace.md."""

from __future__ import annotations

import json

import pytest
import torch

from sparsevlm.methods import SparseVLMConfig
from sparsevlm.methods.accounting import visual_counts_per_layer
from sparsevlm.methods.generation import validate_trace

pytestmark = pytest.mark.usefixtures("torch_single_thread")

# docs/accounting.md: kept + recycled at layers 2 / 6 / 15, and the two token conventions at the
# 32-layer LLaVA-1.5-7B shape.
V15_TABLE = {
    192: ([(300, 9), (200, 4), (110, 3)], 192.03, 206.5),
    128: ([(303, 9), (110, 7), (36, 3)], 128.6, 145.4),
    64: ([(66, 16), (30, 2), (17, 1)], 64.8, 82.3),
}
LAYER_KEYS = {"layer", "kept_indices", "keep_count", "rank", "recycled"}


@pytest.mark.parametrize("budget", sorted(V15_TABLE))
def test_v15_schedule_counts_on_demo(budget, make_vlm, encoded):
    counts, _, _ = V15_TABLE[budget]
    vlm = make_vlm(SparseVLMConfig(method="sparsevlm", budget=budget))
    ids = [row[0][0].tolist() for row in encoded]
    out = vlm.generate(ids, torch.cat([row[1] for row in encoded]), max_new_tokens=1)
    layers = out.trace["layers"]
    assert [entry["layer"] for entry in layers] == [2, 6, 15]
    for entry, (kept, recycled) in zip(layers, counts):
        assert entry["keep_count"] == [kept] * 3
        assert entry["recycled"] == [recycled] * 3
        assert entry["rank"] == [None] * 3
        assert all(len(k) == kept for k in entry["kept_indices"])
    # demo accounting (22 layers), hand-computed from the same counts
    after = [k + r for k, r in counts]
    charged = [576] * 2 + [after[0]] * 4 + [after[1]] * 9 + [after[2]] * 7
    inputs = [576] * 3 + [after[0]] * 4 + [after[1]] * 9 + [after[2]] * 6
    for row in out.accounting["rows"]:
        assert row["equal_tokens"] == pytest.approx(sum(charged) / 22)
        assert row["visual_per_layer_input"] == inputs
        assert row["mean_layer_input_tokens"] == pytest.approx(sum(inputs) / 22)


@pytest.mark.parametrize("budget", sorted(V15_TABLE))
def test_v15_equal_tokens_at_llava_7b_shape(budget):
    counts, equal_tokens, input_mean = V15_TABLE[budget]
    changes = {layer: k + r for layer, (k, r) in zip((2, 6, 15), counts)}
    inputs, charged = visual_counts_per_layer(32, 576, changes)
    # the table holds one decimal, rounded half up (82.25 -> 82.3)
    assert sum(charged) / 32 == pytest.approx(equal_tokens, abs=0.005 if budget == 192 else 0.05)
    assert sum(inputs) / 32 == pytest.approx(input_mean, abs=0.05)
    assert charged[:2] == [576, 576] and charged[2] == changes[2]  # the pruning layer is charged post-pruning
    assert inputs[2] == 576 and inputs[3] == changes[2]  # ... but processes the full set
    if budget == 192:
        assert sum(charged) == 6145  # 2*576 + 4*309 + 9*204 + 17*113 = 6145 -> 192.03125


@pytest.mark.parametrize("variant,extra", [("v1.0", {"scale": 0.0, "bias": 2.0}), ("paper", {"lam": 1.0})])
def test_rank_rule_skip_layers_end_to_end(variant, extra, make_vlm, encoded):
    """Recycling off. v1.0 with keep = int(0*rank + 2) keeps 2 tokens at layer 2; the paper
    rule with lam = 1 keeps rank tokens. At layers 6/15/19 the rater block then has as many
    independent columns as visual tokens (rank == v): the layer is skipped, keeping every id,
    and the run equals one that prunes at layer 2 only."""
    ids, pixels = encoded[0]
    config = SparseVLMConfig(method="sparsevlm", variant=variant, recycle=False, **extra)
    out = make_vlm(config).generate(ids, pixels, max_new_tokens=6)
    layers = out.trace["layers"]
    assert [e["layer"] for e in layers] == [2, 6, 15, 19]
    first = layers[0]
    rank = first["rank"][0]
    assert rank >= 2
    expected_keep = 2 if variant == "v1.0" else 576 - int(1.0 * (576 - rank))
    assert first["keep_count"] == [expected_keep] and first["recycled"] == [0]
    for entry in layers[1:]:
        assert entry["rank"] == [expected_keep]  # rank == v
        assert entry["keep_count"] == [expected_keep]
        assert entry["kept_indices"] == first["kept_indices"]
        assert entry["recycled"] == [0]
    only_first = SparseVLMConfig(method="sparsevlm", variant=variant, recycle=False, prune_layers=(2,), **extra)
    ref = make_vlm(only_first).generate(ids, pixels, max_new_tokens=6)
    assert ref.trace["layers"][0]["kept_indices"] == first["kept_indices"]
    torch.testing.assert_close(torch.tensor(out.trace["logits_last"]), torch.tensor(ref.trace["logits_last"]),
                               rtol=0, atol=1e-5)
    assert out.trace["greedy_tokens"] == ref.trace["greedy_tokens"]


TRACE_CONFIGS = {
    "sparsevlm": (SparseVLMConfig(method="sparsevlm", budget=192),
                  {"name": "sparsevlm", "variant": "v1.5", "budget": 192}, [2, 6, 15]),
    "sparsevlm_v1.0": (SparseVLMConfig(method="sparsevlm", variant="v1.0", budget=128),
                       {"name": "sparsevlm", "variant": "v1.0", "budget": 128, "scale": 9.0, "bias": 6.0,
                        "lam": None}, [2, 6, 15, 19]),
    "fastv": (SparseVLMConfig(method="fastv", K=3, R=0.75), {"name": "fastv", "budget": 144, "K": 3, "R": 0.75}, [2]),
    "fastervlm": (SparseVLMConfig(method="fastervlm", reduction=0.9), {"name": "fastervlm", "budget": 58, "k": 58}, [-1]),
    "none": (SparseVLMConfig(method="none"), {"name": "none"}, []),
}


@pytest.mark.parametrize("name", list(TRACE_CONFIGS))
def test_trace_schema(name, make_vlm, encoded):
    config, method, layer_ids = TRACE_CONFIGS[name]
    ids = [row[0][0].tolist() for row in encoded[:2]]
    out = make_vlm(config).generate(ids, torch.cat([row[1] for row in encoded[:2]]), max_new_tokens=3)
    trace = json.loads(json.dumps(out.trace))  # JSON-serialisable as is
    validate_trace(trace)
    assert set(trace) == {"schema", "method", "layers", "greedy_tokens", "logits_last"}
    assert trace["schema"] == "sparsevlm-trace/1"
    assert trace["method"] == method
    assert [e["layer"] for e in trace["layers"]] == layer_ids
    assert [len(t) for t in trace["greedy_tokens"]] == [3, 3]
    assert all(isinstance(t, int) for row in trace["greedy_tokens"] for t in row)
    assert [len(r) for r in trace["logits_last"]] == [512, 512]
    # the first greedy token is the argmax of logits_last
    assert [row[0] for row in trace["greedy_tokens"]] == torch.tensor(trace["logits_last"]).argmax(-1).tolist()
    for entry in trace["layers"]:
        assert set(entry) == LAYER_KEYS
        for kept, count in zip(entry["kept_indices"], entry["keep_count"]):
            assert kept == sorted(set(kept)) and count == len(kept)
            assert all(isinstance(i, int) and i >= 0 for i in kept)
        assert all(isinstance(r, int) for r in entry["recycled"])
        if config.variant in ("v1.0", "paper"):
            assert all(isinstance(r, int) for r in entry["rank"])
        else:
            assert entry["rank"] == [None, None]


def test_trace_token_ids_track_recycled_tokens(make_vlm, encoded):
    """Ids: patches 0..575, merged tokens 576, 577, ... per row in insertion order; a layer
    keeps only ids that exist at its input."""
    ids = [row[0][0].tolist() for row in encoded]
    out = make_vlm(SparseVLMConfig(method="sparsevlm", budget=128)).generate(
        ids, torch.cat([row[1] for row in encoded]), max_new_tokens=1)
    layers = out.trace["layers"]
    seen_recycled = False
    for row in range(3):
        alive, next_id = set(range(576)), 576
        for entry in layers:
            kept = entry["kept_indices"][row]
            assert set(kept) <= alive
            merged = set(range(next_id, next_id + entry["recycled"][row]))
            next_id += entry["recycled"][row]
            alive = set(kept) | merged
            seen_recycled |= any(i >= 576 for i in kept)
    assert seen_recycled  # some merged token survived a later layer and kept its id


def test_validate_trace_rejects_malformed(make_vlm, encoded):
    out = make_vlm(SparseVLMConfig(method="sparsevlm", budget=64)).generate(*encoded[0], max_new_tokens=1)
    good = json.loads(json.dumps(out.trace))
    validate_trace(good)
    bad_cases = []
    t = json.loads(json.dumps(good)); t["extra"] = 1; bad_cases.append(t)
    t = json.loads(json.dumps(good)); t["schema"] = "other"; bad_cases.append(t)
    t = json.loads(json.dumps(good)); t["layers"][0]["kept_indices"][0].reverse(); bad_cases.append(t)
    t = json.loads(json.dumps(good)); t["layers"][0]["keep_count"][0] += 1; bad_cases.append(t)
    t = json.loads(json.dumps(good)); del t["layers"][0]["rank"]; bad_cases.append(t)
    t = json.loads(json.dumps(good)); t["greedy_tokens"][0][0] = 1.5; bad_cases.append(t)
    for bad in bad_cases:
        with pytest.raises(ValueError, match="trace"):
            validate_trace(bad)
