"""Batch rows behave like independent batch-1 runs: three prompts with different prefix and
text lengths (left padding in the prefix region, right padding in the text region) give the
same kept ids per layer, the same logits and the same tokens as three single runs.

Logits tolerance: in float64 the batched and single logits agree to 1e-6 (the trace stores
float32). In float32 the padded batch sums in a different order, and the demo's logits move
by up to ~1.5e-5 from that alone (HF's own eager and SDPA paths differ by 1.6e-5 on them);
float32 is held to 3e-5 and float64 to 1e-6 so a real row-mixing error (0.03 or more, as the
recycling tie bug this file caught) cannot hide in either."""

from __future__ import annotations

import pytest
import torch

from sparsevlm.methods import SparseVLMConfig

pytestmark = pytest.mark.usefixtures("torch_single_thread")

METHODS = {
    "sparsevlm_v1.5_192": SparseVLMConfig(method="sparsevlm", budget=192),
    "sparsevlm_v1.0_192": SparseVLMConfig(method="sparsevlm", variant="v1.0", budget=192),
    "sparsevlm_paper": SparseVLMConfig(method="sparsevlm", variant="paper", lam=0.5),
    "fastv": SparseVLMConfig(method="fastv", K=2, R=0.5),
    "fastervlm": SparseVLMConfig(method="fastervlm", budget=144),
}
NEW_TOKENS = 8


@pytest.mark.parametrize("dtype,atol", [("float32", 3e-5), ("float64", 1e-6)])
@pytest.mark.parametrize("name", list(METHODS))
def test_batch_equals_single_runs(name, dtype, atol, make_vlm, encoded):
    vlm = make_vlm(METHODS[name], dtype)
    ids = [row[0][0].tolist() for row in encoded]
    assert len({len(x) for x in ids}) == 3
    assert len({x.index(vlm.model.config.image_token_id) for x in ids}) == 3  # different prefixes
    pixels = torch.cat([row[1] for row in encoded]).to(vlm.model.dtype)
    batched = vlm.generate(ids, pixels, max_new_tokens=NEW_TOKENS)
    for row, (ids_row, pixels_row) in enumerate(encoded):
        single = vlm.generate(ids_row, pixels_row.to(vlm.model.dtype), max_new_tokens=NEW_TOKENS)
        assert len(single.trace["layers"]) == len(batched.trace["layers"]) > 0
        for got, ref in zip(batched.trace["layers"], single.trace["layers"]):
            assert got["layer"] == ref["layer"]
            for key in ("kept_indices", "keep_count", "rank", "recycled"):
                assert got[key][row] == ref[key][0], (got["layer"], key)
        torch.testing.assert_close(torch.tensor(batched.trace["logits_last"][row]),
                                   torch.tensor(single.trace["logits_last"][0]), rtol=0, atol=atol)
        assert batched.trace["greedy_tokens"][row] == single.trace["greedy_tokens"][0]
        assert batched.accounting["rows"][row] == single.accounting["rows"][0]


def test_rank_rule_gives_different_keep_counts_per_row(make_vlm, encoded):
    """v1.0 keeps int(13.5 * rank) at layer 2, and the rank follows the prompt's raters: the
    batch then really carries different keep counts per row."""
    vlm = make_vlm(METHODS["sparsevlm_v1.0_192"])
    ids = [row[0][0].tolist() for row in encoded]
    out = vlm.generate(ids, torch.cat([row[1] for row in encoded]), max_new_tokens=1)
    first = out.trace["layers"][0]
    assert first["layer"] == 2
    assert first["keep_count"] == [min(int(r * 13.5), 575) for r in first["rank"]]
    assert len(set(first["keep_count"])) > 1
