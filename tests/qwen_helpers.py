"""Shared by the Qwen2.5-VL tests: the tiny checkpoint (built once per session, loaded the
way users load it), its processor, images of different sizes and a reference generation
composed from the building blocks.

Import the fixtures into a test module with
    from qwen_helpers import qwen_dir, qwen_model, qwen_processor  # noqa: F401
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

# Non-square sizes (width, height) giving different grids: 10x16, 8x8 and 6x12 patches
# after the smart resize (40, 16 and 18 visual tokens), each with window attention over
# padded windows.
IMAGE_SIZES = [(230, 150), (112, 112), (170, 80)]


def make_image(width: int, height: int, seed: int):
    from PIL import Image
    rng = np.random.RandomState(seed)
    base = rng.rand(max(height // 14, 1), max(width // 14, 1), 3)
    pixels = np.kron(base, np.ones((14, 14, 1)))[:height, :width]
    pixels = np.pad(pixels, ((0, height - pixels.shape[0]), (0, width - pixels.shape[1]), (0, 0)), mode="edge")
    pixels = pixels * 0.7 + rng.rand(height, width, 3) * 0.3
    return Image.fromarray((pixels * 255).astype("uint8"))


def make_images():
    return [make_image(w, h, seed) for seed, (w, h) in enumerate(IMAGE_SIZES)]


_CACHE: dict = {}


@pytest.fixture(scope="session")
def qwen_dir(tmp_path_factory):
    if "dir" not in _CACHE:
        from sparsevlm.methods.qwen_demo import build_qwen_demo
        _CACHE["dir"] = build_qwen_demo(tmp_path_factory.mktemp("checkpoints") / "qwen-demo", seed=0)
    return _CACHE["dir"]


@pytest.fixture(scope="session")
def qwen_model(qwen_dir):
    """The tiny checkpoint as plain transformers loads it (float32, SDPA)."""
    if "model" not in _CACHE:
        from transformers import Qwen2_5_VLForConditionalGeneration
        _CACHE["model"] = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(qwen_dir), dtype=torch.float32).eval()
    return _CACHE["model"]


@pytest.fixture(scope="session")
def qwen_processor(qwen_dir):
    if "processor" not in _CACHE:
        from sparsevlm.methods.qwen_processor import QwenImageTextProcessor
        _CACHE["processor"] = QwenImageTextProcessor.from_pretrained(qwen_dir)
    return _CACHE["processor"]


def chat_prompt(processor, question: str) -> str:
    return processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
        add_generation_prompt=True)


@torch.inference_mode()
def blocks_greedy(model, input_ids: list[int], pixel_values, grid_thw, steps: int):
    """Method none composed from the building blocks (no transformers forward): vision,
    prompt positions, decoder layers with explicit masks, then greedy decoding continuing
    from the next position. Returns (last prompt logits [vocab], greedy tokens)."""
    from sparsevlm.methods import modeling
    from sparsevlm.methods import qwen2_5_vl as qwen

    layout = qwen.vision_layout(grid_thw, model.config.vision_config)
    visual = qwen.encode_images(model, pixel_values, **layout.tensors())
    lm = modeling.language_model(model)
    ids = torch.tensor([input_ids])
    hidden = lm.embed_tokens(ids)
    hidden[ids == model.config.image_token_id] = visual.to(hidden.dtype)
    positions, next_position = qwen.prompt_positions(input_ids, model.config.image_token_id, layout.llm_grids)
    seq = len(input_ids)
    cos, sin = modeling.rotary(model, hidden, positions[:, None])
    mask = modeling.prefill_mask(torch.ones(1, seq, dtype=torch.bool))
    caches = []
    for layer in lm.layers:
        hidden, kv, _ = modeling.decoder_layer(layer, hidden, cos, sin, mask)
        caches.append(kv)
    logits = modeling.last_logits(model, hidden, torch.tensor([seq - 1]))
    first_logits, tokens = logits[0], []
    for step in range(steps):
        token = logits.argmax(-1)
        tokens.append(int(token))
        hidden = lm.embed_tokens(token[:, None])
        cos, sin = modeling.rotary(model, hidden, torch.tensor([[next_position + step]]))
        mask = modeling.decode_mask(torch.ones(1, seq + step, dtype=torch.bool))
        for index, layer in enumerate(lm.layers):
            hidden, (key, value), _ = modeling.decoder_layer(layer, hidden, cos, sin, mask, past=caches[index])
            caches[index] = (torch.cat([caches[index][0], key], 2), torch.cat([caches[index][1], value], 2))
        logits = modeling.last_logits(model, hidden, torch.tensor([0]))
    return first_logits, tokens
