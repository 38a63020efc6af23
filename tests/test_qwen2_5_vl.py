"""Qwen2.5-VL building blocks against transformers' own model: the vision tower with its
host-prepared layout (torch and ONNX Runtime, one graph for every grid), mRoPE positions
against get_rope_index, method none (greedy tokens and last logits), the processor loaded
without torchvision, the position rule of pruning, and the method checks."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from qwen_helpers import (blocks_greedy, chat_prompt, make_image, make_images, qwen_dir,  # noqa: F401
                          qwen_model, qwen_processor)
from sparsevlm.methods import qwen2_5_vl as qwen

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def _encode(processor, images, questions):
    return processor(images=images, text=[chat_prompt(processor, q) for q in questions])


# --------------------------------------------------------------------------------------
# Vision tower
# --------------------------------------------------------------------------------------

def test_vision_layout_matches_transformers_index_rules(qwen_model):
    """The host layout equals transformers' own window index, cu_seqlens and patch positions
    (vision_utils), for three grids at once."""
    from transformers.vision_utils import get_vision_position_ids, get_vision_window_index
    vision = qwen_model.config.vision_config
    grids = torch.tensor([[1, 10, 16], [1, 8, 8], [1, 6, 12]])
    layout = qwen.vision_layout(grids, vision)
    window_index, cu_window = get_vision_window_index(grids, vision.spatial_merge_size, vision.window_size,
                                                      vision.patch_size)
    unit = vision.spatial_merge_size ** 2
    assert torch.equal(layout.window_order, (window_index[:, None] * unit + torch.arange(unit)).flatten())
    assert torch.equal(layout.merged_order, torch.argsort(window_index))
    assert torch.equal(layout.patch_positions, get_vision_position_ids(grids, vision.spatial_merge_size))
    # Window ids change exactly at transformers' window boundaries, image ids at each image's.
    change = lambda ids: [0] + [i for i in range(1, len(ids)) if ids[i] != ids[i - 1]] + [len(ids)]
    assert change(layout.window_ids.tolist()) == cu_window.tolist()
    assert change(layout.image_ids.tolist()) == [0, 160, 224, 296]
    assert layout.tokens_per_image == (40, 16, 18)
    assert layout.llm_grids == ((1, 5, 8), (1, 4, 4), (1, 3, 6))


@torch.inference_mode()
def test_vision_tower_equals_transformers_for_several_grids(qwen_model, qwen_processor):
    images = make_images()
    encoded = qwen_processor(images=images, text=["<|image_pad|>"] * 3)
    grids = encoded["image_grid_thw"]
    reference = torch.cat(qwen_model.model.get_image_features(encoded["pixel_values"], grids).pooler_output)
    layout = qwen.vision_layout(grids, qwen_model.config.vision_config)
    ours = qwen.encode_images(qwen_model, encoded["pixel_values"], **layout.tensors())
    assert ours.shape == reference.shape == (40 + 16 + 18, qwen_model.config.text_config.hidden_size)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)
    # The window masks matter: one window over each whole image changes the result.
    windowless = dict(layout.tensors(), window_ids=layout.image_ids)
    assert (qwen.encode_images(qwen_model, encoded["pixel_values"], **windowless) - reference).abs().max() > 1e-3


class _VisionGraph(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, *tensors):
        return qwen.encode_rows(self.model, dict(zip(qwen.VISION_INPUT_NAMES, tensors)))


@torch.inference_mode()
def test_vision_onnx_one_graph_for_every_grid(qwen_model, qwen_processor, tmp_path):
    """One exported vision graph runs two different grids (and a batch of three) in ONNX
    Runtime and matches torch within 1e-4."""
    import onnxruntime as ort
    names = list(qwen.VISION_INPUT_NAMES)
    axes = {"patches": {0: "patches"}, "window_order": {0: "patches"}, "patch_positions": {0: "patches"},
            "window_ids": {0: "patches"}, "image_ids": {0: "patches"}, "image_index": {0: "batch", 1: "visual_len"},
            "image_valid": {0: "batch", 1: "visual_len"}, "features": {0: "batch", 1: "visual_len"}}
    vision = qwen_model.config.vision_config
    first = qwen_processor(images=[make_image(112, 112, 0)], text=["<|image_pad|>"])
    example, _ = qwen.vision_inputs(first["pixel_values"], first["image_grid_thw"], vision)
    path = tmp_path / "vision.onnx"
    torch.onnx.export(_VisionGraph(qwen_model), tuple(example[n] for n in names), str(path), dynamo=False,
                      opset_version=17, input_names=names, output_names=["features"], dynamic_axes=axes)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for images in ([make_image(230, 150, 1)], [make_image(170, 80, 2)], make_images()):
        encoded = qwen_processor(images=images, text=["<|image_pad|>"] * len(images))
        inputs, _ = qwen.vision_inputs(encoded["pixel_values"], encoded["image_grid_thw"], vision)
        (features,) = session.run(None, {n: inputs[n].numpy() for n in names})
        expected = qwen.encode_rows(qwen_model, inputs)
        assert features.shape == tuple(expected.shape)
        np.testing.assert_allclose(features, expected.numpy(), atol=1e-4, rtol=0)
        reference = qwen_model.model.get_image_features(encoded["pixel_values"], encoded["image_grid_thw"])
        np.testing.assert_allclose(features[-1, :len(reference.pooler_output[-1])],
                                   reference.pooler_output[-1].numpy(), atol=1e-4, rtol=0)


# --------------------------------------------------------------------------------------
# Positions
# --------------------------------------------------------------------------------------

def test_prompt_positions_equal_get_rope_index(qwen_model, qwen_processor):
    """Image first, image in the middle, a long text, three grids."""
    image_token = qwen_model.config.image_token_id
    cases = [(make_image(230, 150, 0), chat_prompt(qwen_processor, "What is in the image?")),
             (make_image(170, 80, 1), "Look: <|vision_start|><|image_pad|><|vision_end|> and tell me which shape."),
             (make_image(112, 112, 2), "<|image_pad|> red")]
    for image, text in cases:
        encoded = qwen_processor(images=[image], text=[text])
        grid = encoded["image_grid_thw"]
        expected, delta = qwen_model.model.get_rope_index(encoded["input_ids"], encoded["mm_token_type_ids"],
                                                          image_grid_thw=grid)
        layout = qwen.vision_layout(grid, qwen_model.config.vision_config)
        positions, next_position = qwen.prompt_positions(encoded["input_ids"][0].tolist(), image_token,
                                                         layout.llm_grids)
        assert torch.equal(positions, expected[:, 0])
        assert next_position == encoded["input_ids"].shape[1] + int(delta)  # decoding continues here


def test_region_positions_equal_each_rows_prompt_positions():
    """The region batch [prefix (left-padded) | visual | text (right-padded)] gives every row
    the ids of its unpadded prompt, padding 0."""
    image = 99
    grids = [(1, 5, 8), (1, 2, 2), (1, 3, 6)]
    prompts = [[1, 2, 3] + [image] * 40 + [4, 5], [7] + [image] * 4 + [8, 9, 10, 11, 12], [image] * 18 + [6]]
    prefix_valid = torch.tensor([[1, 1, 1], [0, 0, 1], [0, 0, 0]], dtype=torch.bool)
    text_valid = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    positions, next_position = qwen.region_positions(prefix_valid, grids, 40, text_valid)
    assert positions.shape == (3, 3 + 40 + 5, 3)
    for row, (ids, grid) in enumerate(zip(prompts, grids)):
        expected, expected_next = qwen.prompt_positions(ids, image, [grid])
        count = grid[1] * grid[2]
        valid = torch.cat([prefix_valid[row], torch.arange(40) < count, text_valid[row]])
        assert torch.equal(qwen.as_rotary(positions)[:, row, valid], expected)
        assert bool((positions[row, ~valid] == 0).all())
        assert int(next_position[row]) == expected_next
    # Hand-checked: row 1's prefix [7] is position 0, its 2x2 image (0, 1+r, 1+c), its text from 3.
    assert positions[1, 2].tolist() == [0, 0, 0]
    assert positions[1, 3:7].tolist() == [[1, 1, 1], [1, 1, 2], [1, 2, 1], [1, 2, 2]]
    assert positions[1, 43:48, 0].tolist() == [3, 4, 5, 6, 7] and int(next_position[1]) == 8


def test_pruned_positions_hand_built():
    """Kept tokens keep their (t, h, w), a merged token takes its cluster centre's, padding 0."""
    # One row: a 2x3 image at start 4 (ids (4, 4+r, 4+c)), V = 6 slots.
    visual = qwen.image_positions(4, (1, 2, 3)).T[None]  # [1, 6, 3]
    # Keep slots 0, 2, 5; one merged token (slot V + 0) whose centre is slot 4; one padding.
    out = qwen.pruned_positions(visual, torch.tensor([[0, 2, 5, 6, -1]]), torch.tensor([[4]]))
    assert out[0].tolist() == [[4, 4, 4], [4, 4, 6], [4, 5, 6], [4, 5, 5], [0, 0, 0]]
    # Two rows, the second without merged tokens (its centre slot is never read); FastV: no C.
    visual2 = torch.cat([visual, qwen.image_positions(9, (1, 2, 3)).T[None]])
    out2 = qwen.pruned_positions(visual2, torch.tensor([[0, 2, 5, 6, -1], [1, 3, -1, -1, -1]]),
                                 torch.tensor([[4], [-1]]))
    assert out2[1].tolist() == [[9, 9, 10], [9, 10, 9], [0, 0, 0], [0, 0, 0], [0, 0, 0]]
    fastv = qwen.pruned_positions(visual2, torch.tensor([[1, 4], [0, 5]]), None)
    assert fastv.tolist() == [[[4, 4, 5], [4, 5, 5]], [[9, 9, 9], [9, 10, 11]]]


# --------------------------------------------------------------------------------------
# Method none: the building blocks give transformers' greedy tokens and last logits
# --------------------------------------------------------------------------------------

@torch.inference_mode()
def test_building_blocks_equal_transformers_non_square(qwen_model, qwen_processor):
    encoded = _encode(qwen_processor, [make_image(230, 150, 0)], ["What is in the image?"])
    assert encoded["image_grid_thw"].tolist() == [[1, 10, 16]]  # non-square: 5x8 visual tokens
    reference_logits = qwen_model(**encoded).logits[0, -1].float()
    reference = qwen_model.generate(**encoded, max_new_tokens=8, do_sample=False)[0, encoded["input_ids"].shape[1]:]
    logits, tokens = blocks_greedy(qwen_model, encoded["input_ids"][0].tolist(), encoded["pixel_values"],
                                   encoded["image_grid_thw"], 8)
    torch.testing.assert_close(logits, reference_logits, atol=1e-4, rtol=0)
    assert tokens == reference.tolist()


# --------------------------------------------------------------------------------------
# Processor without torchvision; methods; aliases
# --------------------------------------------------------------------------------------

def test_processor_loads_public_layout_without_torchvision(qwen_dir, qwen_processor):
    files = {p.name for p in qwen_dir.iterdir()}
    assert {"preprocessor_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.json"} <= files
    if importlib.util.find_spec("torchvision") is None:  # why this processor exists: transformers' needs it
        from transformers import AutoProcessor
        with pytest.raises(ImportError, match="Torchvision"):
            AutoProcessor.from_pretrained(str(qwen_dir))
    image = make_image(230, 150, 0)
    prompt = chat_prompt(qwen_processor, "What is in the image?")
    assert "<|vision_start|><|image_pad|><|vision_end|>What is in the image?" in prompt
    encoded = qwen_processor(images=[image], text=[prompt])
    ids = encoded["input_ids"][0].tolist()
    pad = qwen_processor.image_token_id
    run = [i for i, t in enumerate(ids) if t == pad]
    assert len(run) == 40 and run == list(range(run[0], run[0] + 40))  # 10x16 patches / 4
    tokenizer = qwen_processor.tokenizer
    before, after = prompt.split("<|image_pad|>")
    assert ids == tokenizer(before)["input_ids"] + [pad] * 40 + tokenizer(after)["input_ids"]
    assert encoded["pixel_values"].shape == (160, 3 * 2 * 14 * 14)
    # Saved and loaded again: the same encoding.
    from sparsevlm.methods.qwen_processor import QwenImageTextProcessor
    qwen_processor.save_pretrained(qwen_dir.parent / "saved-processor")
    again = QwenImageTextProcessor.from_pretrained(qwen_dir.parent / "saved-processor")(images=[image], text=[prompt])
    assert torch.equal(again["input_ids"], encoded["input_ids"])
    assert torch.equal(again["pixel_values"], encoded["pixel_values"])


def test_processor_refuses_video(qwen_processor):
    from sparsevlm.methods.generation import InputError
    with pytest.raises(InputError, match="video input is not supported"):
        qwen_processor(videos=[np.zeros((2, 28, 28, 3), dtype=np.uint8)], text=["<|video_pad|>"])
    with pytest.raises(InputError, match="video input is not supported"):
        qwen_processor(text=["<|vision_start|><|video_pad|><|vision_end|> what happens?"])


def test_fastervlm_refused_for_qwen():
    from sparsevlm.methods import ConfigError, SparseVLMConfig
    with pytest.raises(ConfigError, match=r"no \[CLS\] token"):
        qwen.check_method(SparseVLMConfig(method="fastervlm", budget=64))
    for config in (SparseVLMConfig(method="sparsevlm", budget=192), SparseVLMConfig(method="fastv", R=0.5),
                   SparseVLMConfig(method="none")):
        qwen.check_method(config)


@pytest.mark.parametrize("alias, layers, hidden, kv_heads, vocab, tied", [
    ("qwen2.5-vl-3b", 36, 2048, 2, 151936, True),
    ("qwen2.5-vl-7b", 28, 3584, 4, 152064, False),
])
def test_aliases_build_the_published_architecture(alias, layers, hidden, kv_heads, vocab, tied):
    from sparsevlm.methods.loading import ALIASES, load_config
    config, location = load_config(alias, random_weights=True)
    assert location == ALIASES[alias] and location.startswith("Qwen/Qwen2.5-VL-")
    assert config.model_type == "qwen2_5_vl"
    text, vision = config.text_config, config.vision_config
    assert (text.num_hidden_layers, text.hidden_size, text.num_key_value_heads, text.vocab_size) == \
        (layers, hidden, kv_heads, vocab)
    assert config.tie_word_embeddings is tied
    assert text.rope_parameters["mrope_section"] == [16, 24, 24]
    assert (vision.depth, vision.hidden_size, vision.window_size, list(vision.fullatt_block_indexes)) == \
        (32, 1280, 112, [7, 15, 23, 31])
    assert vision.out_hidden_size == hidden and config.image_token_id == 151655
    with torch.device("meta"):
        from transformers import Qwen2_5_VLForConditionalGeneration
        model = Qwen2_5_VLForConditionalGeneration._from_config(config)
    params = sum(p.numel() for p in model.parameters())
    # The published sizes: 3.75B (tied embeddings) and 8.29B parameters.
    assert abs(params / 1e9 - (3.75 if tied else 8.29)) < 0.02


@torch.inference_mode()
def test_brute_force_reference_is_transformers_for_method_none(qwen_model, qwen_processor):
    """The brute-force reference the pruning tests compare against, without pruning, is
    transformers' model: last logits, and every greedy token recomputed from scratch."""
    from qwen_helpers import bf_forward
    encoded = _encode(qwen_processor, [make_image(170, 80, 2)], ["Is there a red circle?"])
    ids = encoded["input_ids"][0].tolist()
    generated = qwen_model.generate(**encoded, max_new_tokens=4, do_sample=False)[0, len(ids):].tolist()
    for step in range(4):
        logits, decisions = bf_forward(qwen_model, ids, encoded["pixel_values"], encoded["image_grid_thw"],
                                       {"name": "none"}, generated[:step])
        assert int(logits.argmax()) == generated[step] and decisions == []
        if step == 0:
            torch.testing.assert_close(logits, qwen_model(**encoded).logits[0, -1], atol=1e-4, rtol=0)


@torch.inference_mode()
def test_vision_rows_hold_each_images_tokens(qwen_model, qwen_processor):
    """The vision graph's per-row output: row b holds image b's tokens (transformers' own
    features), zeros past its count; bad pixel values / grids are refused by name."""
    from sparsevlm.methods.generation import InputError
    encoded = qwen_processor(images=make_images(), text=["<|image_pad|>"] * 3)
    vision = qwen_model.config.vision_config
    inputs, layout = qwen.vision_inputs(encoded["pixel_values"], encoded["image_grid_thw"], vision)
    rows = qwen.encode_rows(qwen_model, inputs)
    expected = qwen_model.model.get_image_features(encoded["pixel_values"], encoded["image_grid_thw"]).pooler_output
    assert rows.shape == (3, 40, qwen_model.config.text_config.hidden_size)
    for row, features in enumerate(expected):
        torch.testing.assert_close(rows[row, :len(features)], features, atol=1e-5, rtol=0)
        assert bool((rows[row, len(features):] == 0).all())
    assert inputs["image_valid"].sum(dim=1).tolist() == [40, 16, 18]
    with pytest.raises(InputError, match="pixel_values: expected shape"):
        qwen.vision_inputs(encoded["pixel_values"][:-4], encoded["image_grid_thw"], vision)
    with pytest.raises(InputError, match="not an image grid"):
        qwen.vision_inputs(encoded["pixel_values"], torch.tensor([[1, 10, 15], [1, 8, 8], [1, 6, 12]]), vision)


def test_visual_count_range_bounds_every_image(qwen_processor):
    """Every image size's visual count (transformers' smart_resize) lies in the range, and
    the range's ends are reached."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize
    low_pixels, high_pixels = qwen.processor_pixel_range(qwen_processor)
    assert (low_pixels, high_pixels) == (56 * 56, 448 * 448)
    low, high = qwen.visual_count_range(low_pixels, high_pixels)
    assert (low, high) == (4, 256)
    counts = set()
    for height in range(14, 700, 23):
        for width in range(14, 700, 31):
            if max(height, width) / min(height, width) > 20:
                continue
            h, w = smart_resize(height, width, 28, low_pixels, high_pixels)
            counts.add(h * w // 28 ** 2)
    assert min(counts) == low and max(counts) == high
    assert qwen.visual_count_range(qwen.PUBLIC_MIN_PIXELS, qwen.PUBLIC_MAX_PIXELS) == (4, 16384)
