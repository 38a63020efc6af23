"""Session fixtures for the methods tests: the demo LLaVA checkpoint is built once into a
temporary directory and loaded once, through the same from_pretrained path users take.

`hf_model` is plain `transformers` with its default SDPA attention (the float32 reference for
logits: eager and SDPA themselves differ by ~1.6e-5 on the demo's last-position logits, more
than the 1e-5 the parity tests demand, while the wrapper, also on SDPA, matches SDPA to ~1e-6);
`hf_eager` is the same checkpoint with eager attention, which materialises the full attention
probabilities (`output_attentions=True`).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

# Prompts with different prefix and text lengths (raw, no chat template): the batched runs
# then have left padding in the prefix region and right padding in the text region.
RAW_PROMPTS = [
    "USER: <image>\nWhat is in the image? ASSISTANT:",
    "USER: Look at this picture carefully and answer. <image>\nHow many objects are there? "
    "Answer the question using a single word or phrase. ASSISTANT:",
    "<image>\nIs there a red circle? ASSISTANT:",
]


@pytest.fixture(scope="module")
def torch_single_thread():
    """One intra-op thread for the methods tests (restored afterwards): the tiny demo model
    gains nothing from a second thread, and on this shared, oversubscribed 2-core machine two
    OpenMP threads ran 3-10x slower. Used by the test_methods_* modules through `pytestmark`."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory):
    from sparsevlm.methods.demo_model import build_demo_model
    return build_demo_model(tmp_path_factory.mktemp("checkpoints") / "sparsevlm-demo", seed=0)


def _load_hf(demo_dir, attn_implementation):
    from transformers import LlavaForConditionalGeneration
    model = LlavaForConditionalGeneration.from_pretrained(str(demo_dir), dtype=torch.float32,
                                                          attn_implementation=attn_implementation)
    return model.eval()


@pytest.fixture(scope="session")
def hf_model(demo_dir):
    """The demo checkpoint as plain transformers loads it (float32, its default SDPA attention)."""
    return _load_hf(demo_dir, "sdpa")


@pytest.fixture(scope="session")
def hf_model64(demo_dir):
    """The checkpoint in float64: separates real batch/single differences from float32 noise."""
    from transformers import LlavaForConditionalGeneration
    return LlavaForConditionalGeneration.from_pretrained(str(demo_dir), dtype=torch.float64).eval()


@pytest.fixture(scope="session")
def hf_eager(demo_dir):
    """The same checkpoint with eager attention, for `output_attentions=True`."""
    return _load_hf(demo_dir, "eager")


@pytest.fixture(scope="session")
def processor(demo_dir):
    from transformers import AutoProcessor
    return AutoProcessor.from_pretrained(str(demo_dir))


@pytest.fixture(scope="session")
def images():
    from PIL import Image
    rng = np.random.RandomState(1234)
    out = []
    for _ in range(3):
        base = rng.rand(8, 8, 3)  # blocky images: structured, not white noise
        pixels = np.kron(base, np.ones((42, 42, 1))) * 0.7 + rng.rand(336, 336, 3) * 0.3
        out.append(Image.fromarray((pixels * 255).astype("uint8")))
    return out


@pytest.fixture(scope="session")
def encoded(processor, images):
    """Processor outputs for each RAW_PROMPTS row alone: list of (input_ids [1, S], pixel_values [1, 3, 336, 336])."""
    rows = []
    for image, prompt in zip(images, RAW_PROMPTS):
        enc = processor(images=[image], text=[prompt], return_tensors="pt")
        rows.append((enc["input_ids"], enc["pixel_values"]))
    return rows


@pytest.fixture(scope="session")
def make_vlm(hf_model, processor, request):
    """SparseLlava over the already-loaded model, for a config (cached per config);
    `make_vlm(config, dtype="float64")` wraps the float64 copy instead."""
    from sparsevlm.methods import SparseLlava
    cache = {}

    def make(config, dtype="float32"):
        key = (repr(config), dtype)
        if key not in cache:
            model = hf_model if dtype == "float32" else request.getfixturevalue("hf_model64")
            cache[key] = SparseLlava(model, config, processor)
        return cache[key]
    return make
