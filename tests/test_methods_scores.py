"""The scores each method ranks visual tokens by, against the fully materialised attention of
plain `transformers` (eager attention, `output_attentions=True`) and brute-force rules.

SparseVLM: raters recomputed with plain loops from the layer-0 inputs, scores = mean over
rater rows of the head-mean attention of layer 2 over the visual columns. FastV: the last
prompt token's row at layer K-1. FasterVLM: the CLIP [CLS] row at the feature layer.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sparsevlm.methods import SparseVLMConfig
from sparsevlm.methods.generation import make_region_batch

pytestmark = pytest.mark.usefixtures("torch_single_thread")

NUM_VISUAL = 576


def _image_span(ids: list[int], image_token_id: int) -> tuple[int, int]:
    positions = [i for i, t in enumerate(ids) if t == image_token_id]
    assert len(positions) == NUM_VISUAL and positions[-1] - positions[0] == NUM_VISUAL - 1
    return positions[0], positions[-1] + 1


def brute_force_raters(visual: np.ndarray, text: np.ndarray) -> list[int]:
    """The rater rule of docs/trace.md with plain loops: r_j = mean_i softmax_j(v_i . t_j); raters r_j > mean(r)."""
    relevance = [0.0] * len(text)
    for v in visual:
        logits = [float(np.dot(v, t)) for t in text]
        top = max(logits)
        exps = [math.exp(x - top) for x in logits]
        total = sum(exps)
        for j, e in enumerate(exps):
            relevance[j] += e / total / len(visual)
    mean = sum(relevance) / len(relevance)
    return [j for j, r in enumerate(relevance) if r > mean]


@pytest.fixture(scope="module")
def hf_attention(hf_eager, encoded):
    """Per prompt (alone, unpadded): image span, layer-0 inputs, head-mean attention per layer."""
    image_token_id = hf_eager.config.image_token_id
    refs = []
    with torch.no_grad():
        for ids, pixels in encoded:
            out = hf_eager(input_ids=ids, pixel_values=pixels, output_attentions=True, output_hidden_states=True)
            start, stop = _image_span(ids[0].tolist(), image_token_id)
            refs.append({"span": (start, stop), "layer0": out.hidden_states[0][0].double().numpy(),
                         "attn": [a[0].double().mean(0) for a in out.attentions[:3]]})
    return refs


def _segment0(vlm, encoded):
    """Run segment 0 of the method on the B=3 region batch (left-padded prefixes)."""
    ids = [row[0][0].tolist() for row in encoded]
    pixels = torch.cat([row[1] for row in encoded])
    batch = make_region_batch(ids, vlm.model.config.image_token_id, NUM_VISUAL, vlm.pad_id)
    assert batch.prefix_valid.sum(1).tolist() != [batch.prefix_valid.shape[1]] * 3  # padding present
    executor = vlm.executor
    vision = executor.vision(pixels)
    inputs = {"prefix_ids": batch.prefix_ids, "prefix_valid": batch.prefix_valid, "visual": vision["visual"],
              "text_ids": batch.text_ids, "text_valid": batch.text_valid}
    return batch, executor.segment(0, inputs)


@pytest.mark.parametrize("variant", ["v1.5", "v1.0"])
def test_sparsevlm_scores_equal_full_attention(variant, make_vlm, encoded, hf_attention):
    config = SparseVLMConfig(method="sparsevlm", budget=192, variant=variant)
    vlm = make_vlm(config)
    assert vlm.plan.prune_layers[0] == 2
    batch, out = _segment0(vlm, encoded)
    for row, ref in enumerate(hf_attention):
        start, stop = ref["span"]
        layer0 = ref["layer0"]
        raters = brute_force_raters(layer0[start:stop], layer0[stop:])
        text_len = len(layer0) - stop
        assert 0 < len(raters) < text_len
        got_raters = out["rater_mask"][row].nonzero()[:, 0].tolist()
        assert got_raters == raters

        attn = ref["attn"][2]  # [L, L] head mean at pruning layer 2
        block = attn[[stop + j for j in raters]][:, start:stop]
        expected = block.mean(0)
        torch.testing.assert_close(out["scores"][row].double(), expected, rtol=0, atol=1e-6)
        if variant == "v1.0":
            # the rater-by-visual block the rank rule sees, restricted to this row's raters
            got_block = out["rater_attention"][row].double()[out["rater_mask"][row]]
            torch.testing.assert_close(got_block, block, rtol=0, atol=1e-6)
            assert int(torch.linalg.matrix_rank(got_block.float())) == int(torch.linalg.matrix_rank(block.float()))
        # the top-300 boundary at layer 2 is separated by far more than the two
        # implementations' float32 disagreement, so the decisions compared elsewhere are real
        # (float32 error scales with the score; large scores, up to ~0.15, carry ~4e-7)
        ordered, order = torch.sort(expected, descending=True)
        error = (out["scores"][row].double() - expected).abs()[order[290:310]].max()
        assert float(ordered[299] - ordered[300]) > max(20 * float(error), 1e-7)


def test_sparsevlm_trace_layer2_uses_full_attention_topk(make_vlm, encoded, hf_attention):
    """End to end: layer 2's kept ids are the top-300 of the brute-force scores, ascending."""
    vlm = make_vlm(SparseVLMConfig(method="sparsevlm", budget=192))
    for (ids, pixels), ref in zip(encoded, hf_attention):
        start, stop = ref["span"]
        layer0 = ref["layer0"]
        raters = brute_force_raters(layer0[start:stop], layer0[stop:])
        scores = ref["attn"][2][[stop + j for j in raters]][:, start:stop].mean(0).tolist()
        expected = sorted(sorted(range(NUM_VISUAL), key=lambda i: (-scores[i], i))[:300])
        out = vlm.generate(ids, pixels, max_new_tokens=1)
        assert out.trace["layers"][0]["kept_indices"][0] == expected


def test_fastv_scores_equal_last_row_of_full_attention(make_vlm, encoded, hf_attention):
    vlm = make_vlm(SparseVLMConfig(method="fastv", K=2, R=0.5))
    assert vlm.plan.prune_layers == (1,)
    _, out = _segment0(vlm, encoded)
    for row, ref in enumerate(hf_attention):
        start, stop = ref["span"]
        expected = ref["attn"][1][-1, start:stop]  # last prompt token, layer K-1 = 1
        torch.testing.assert_close(out["scores"][row].double(), expected, rtol=0, atol=1e-6)
        # kept = top round(576 * 0.5) = 288, original order
        kept = sorted(sorted(range(NUM_VISUAL), key=lambda i: (-float(expected[i]), i))[:288])
        trace = vlm.generate(encoded[row][0], encoded[row][1], max_new_tokens=1).trace
        assert trace["layers"][0]["layer"] == 1
        assert trace["layers"][0]["kept_indices"][0] == kept


def test_fastervlm_cls_scores_equal_clip_attention(make_vlm, hf_eager, encoded):
    vlm = make_vlm(SparseVLMConfig(method="fastervlm", budget=144))
    for ids, pixels in encoded:
        with torch.no_grad():
            vision = hf_eager.model.vision_tower(pixels, output_attentions=True, output_hidden_states=True)
        # vision_feature_layer -2: the block producing hidden_states[-2] is attentions[-2]
        cls = vision.attentions[-2][0, :, 0, 1:].double().mean(0)
        order = sorted(range(NUM_VISUAL), key=lambda i: (-float(cls[i]), i))
        assert float(cls[order[143]] - cls[order[144]]) > 1e-7
        trace = vlm.generate(ids, pixels, max_new_tokens=1).trace
        assert trace["layers"][0]["layer"] == -1
        assert trace["layers"][0]["kept_indices"][0] == sorted(order[:144])
