"""SparseVLM (v1.5 scaled schedule, v1.0 rank rule, recycling) and FastV on Qwen2.5-VL through
the toolkit's route (region batch, segments, decode) against the brute-force reference
(qwen_helpers.bf_forward: every layer recomputed over the whole sequence with the position
rule of docs/qwen2_5_vl.md), and batch rows against their batch-1 runs."""

from __future__ import annotations

import pytest
import torch

from qwen_helpers import bf_forward, make_images, qwen_dir, qwen_model, qwen_processor  # noqa: F401
from sparsevlm.methods import SparseLlava, SparseVLMConfig
from sparsevlm.methods.config import V10_PRESETS, V15_SCHEDULES

pytestmark = pytest.mark.usefixtures("torch_single_thread")

QUESTIONS = ["What is in the image?", "How many objects are there? Answer with one word.", "Is there a red circle?"]
STEPS = 6
CONFIGS = {
    "sparsevlm_v15": SparseVLMConfig(method="sparsevlm", variant="v1.5", budget=192),
    "sparsevlm_v10": SparseVLMConfig(method="sparsevlm", variant="v1.0", budget=64),
    "fastv": SparseVLMConfig(method="fastv", K=2, R=0.5),
}


def bf_method(name: str) -> dict:
    """The brute force's statement of each method's keep rule (docs/qwen2_5_vl.md)."""
    if name == "sparsevlm_v15":
        schedule = V15_SCHEDULES[192]
        return {"name": "sparsevlm", "layers": (2, 6, 15), "recycle": True,
                "keep": lambda p, v, n, rank: min(round(schedule[p] * n / 576), v - 1)}
    if name == "sparsevlm_v10":
        scale, bias = V10_PRESETS[64]

        def keep(p, v, n, rank):
            return v if v == rank else min(max(int(rank * scale + bias), 0), v - 1)
        return {"name": "sparsevlm", "layers": (2, 6, 15, 19), "recycle": True, "rank": True, "keep": keep}
    return {"name": "fastv", "layers": (1,), "keep": lambda p, v, n, rank: min(round(n * 0.5), v)}


_RUNS: dict = {}


def _run(model, processor, name: str, rows: list[int]):
    key = (name, tuple(rows))
    if key not in _RUNS:
        vlm = SparseLlava(model, CONFIGS[name], processor)
        images = make_images()
        inputs = vlm.prepare([images[r] for r in rows], [QUESTIONS[r] for r in rows])
        out = vlm.generate(inputs["input_ids"], inputs["pixel_values"], max_new_tokens=STEPS,
                           image_sizes=inputs["image_grid_thw"])
        _RUNS[key] = (inputs, out)
    return _RUNS[key]


@pytest.mark.parametrize("name", list(CONFIGS))
@torch.inference_mode()
def test_route_equals_brute_force_and_decode_equals_recomputation(name, qwen_model, qwen_processor):
    """Batch 1: the same kept tokens per pruning layer, last logits within 1e-4, and every
    decoded token equal to the argmax of a full recomputation (same pruning decisions) of the
    prompt plus the tokens before it, with logits within 1e-4 at each step."""
    inputs, out = _run(qwen_model, qwen_processor, name, [0])
    ids, grid = inputs["input_ids"][0], inputs["image_grid_thw"]
    method = bf_method(name)
    tokens = out.sequences[0].tolist()
    for step in range(STEPS):
        logits, decisions = bf_forward(qwen_model, ids, inputs["pixel_values"], grid, method, tokens[:step])
        assert int(logits.argmax()) == tokens[step], f"step {step}"
        if step == 0:
            torch.testing.assert_close(logits, torch.tensor(out.trace["logits_last"][0]), atol=1e-4, rtol=0)
            layers = out.trace["layers"]
            assert [d[0] for d in decisions] == [layer["layer"] for layer in layers]
            assert [d[1] for d in decisions] == [layer["kept_indices"][0] for layer in layers]
            assert [d[2] for d in decisions] == [layer["recycled"][0] for layer in layers]
        else:  # the pruning decisions do not depend on the generated tokens
            assert [d[1] for d in decisions] == [layer["kept_indices"][0] for layer in out.trace["layers"]]
    # Something was pruned, and the v1.5 schedule is the scaled one: 40 visual tokens.
    counts = [layer["keep_count"][0] for layer in out.trace["layers"]]
    if name == "sparsevlm_v15":
        assert counts == [round(k * 40 / 576) for k in V15_SCHEDULES[192]] == [21, 14, 8]
    elif name == "fastv":
        assert counts == [20]
    else:
        assert min(counts) < 40


@pytest.mark.parametrize("name", list(CONFIGS))
def test_batch_rows_equal_their_batch_1_runs(name, qwen_model, qwen_processor):
    """Three images of different sizes (40, 16, 18 visual tokens) and prompt lengths in one
    batch: every row decides, decodes and scores as its batch-1 run."""
    _, batch = _run(qwen_model, qwen_processor, name, [0, 1, 2])
    for row in range(3):
        _, single = _run(qwen_model, qwen_processor, name, [row])
        for layer_b, layer_s in zip(batch.trace["layers"], single.trace["layers"]):
            for key in ("kept_indices", "keep_count", "rank", "recycled"):
                assert layer_b[key][row] == layer_s[key][0], (row, layer_b["layer"], key)
        assert batch.sequences[row].tolist() == single.sequences[0].tolist()
        torch.testing.assert_close(torch.tensor(batch.trace["logits_last"][row]),
                                   torch.tensor(single.trace["logits_last"][0]), atol=1e-4, rtol=0)
        # The accounting charges each row its own image: the unpruned cost counts its N visual tokens.
        assert batch.accounting["rows"][row] == single.accounting["rows"][0]
    counts = [rows["visual_per_layer_input"][0] for rows in batch.accounting["rows"]]
    assert counts == [40, 16, 18]
