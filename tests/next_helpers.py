"""Shared by the LLaVA-NeXT tests (tests/test_next.py, tests/test_triton_next.py): the tiny
anyres checkpoint, its test images, and its exported artifacts and runs, each made at most once
per session (module-level caches, as tests/export_helpers.py).

Import the fixtures into a test module with
    from next_helpers import next_dir, next_artifacts, ...  # noqa: F401
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sparsevlm.methods import SparseVLMConfig

NUM_LAYERS = 8
# (height, width) of the test images: 5, 5 and 3 tiles, three different visual counts
IMAGE_SIZES = [(100, 170), (150, 150), (90, 160)]
PROMPTS = ["What is in the image?",
           "Look at this picture carefully. How many objects are there? Answer with a single word.",
           "Is there a red circle?"]
RAW_PROMPT = "USER: <image>\nWhat is in the image? ASSISTANT:"
NEW_TOKENS = 8
METHODS = {
    "none": dict(method="none", budgets=None),
    "sparsevlm_v15_b192": dict(method="sparsevlm", variant="v1.5", budgets=[192], prune_layers=(2, 4, 6)),
    "sparsevlm_v10_b192": dict(method="sparsevlm", variant="v1.0", budgets=[192], prune_layers=(2, 4, 5, 6)),
    "fastervlm_r0.9": dict(method="fastervlm", budgets=None, reduction=0.9),
    "fastv_R0.5": dict(method="fastv", budgets=None, K=2, R=0.5),
}
PRUNING = [name for name in METHODS if name != "none"]

_ARTIFACTS: dict = {}
_PIPELINES: dict = {}
_RUNS: dict = {}


def method_config(name: str) -> SparseVLMConfig:
    kwargs = dict(METHODS[name])
    budgets = kwargs.pop("budgets")
    return SparseVLMConfig(budget=budgets[0] if budgets else None, **kwargs)


@pytest.fixture(scope="session")
def next_dir(tmp_path_factory):
    from sparsevlm.methods.demo_next import build_demo_next_model
    return build_demo_next_model(tmp_path_factory.mktemp("checkpoints") / "demo-next", num_layers=NUM_LAYERS)


@pytest.fixture(scope="session")
def hf_next(next_dir):
    from transformers import LlavaNextForConditionalGeneration
    return LlavaNextForConditionalGeneration.from_pretrained(str(next_dir), dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def next_processor(next_dir):
    from transformers import AutoProcessor
    return AutoProcessor.from_pretrained(str(next_dir))


@pytest.fixture(scope="session")
def next_images():
    from PIL import Image
    rng = np.random.RandomState(77)
    images = []
    for height, width in IMAGE_SIZES:
        base = rng.rand(6, 6, 3)  # blocky, structured images
        blocks = np.kron(base, np.ones((-(-height // 6), -(-width // 6), 1)))[:height, :width]
        pixels = blocks * 0.7 + rng.rand(height, width, 3) * 0.3
        images.append(Image.fromarray((pixels * 255).astype("uint8")))
    return images


@pytest.fixture(scope="session")
def next_artifacts(next_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("next-artifacts")

    def get(name: str):
        if name not in _ARTIFACTS:
            from sparsevlm.export import export
            out = root / name
            export(str(next_dir), out, progress=False, **METHODS[name])
            _ARTIFACTS[name] = out
        return _ARTIFACTS[name]
    return get


@pytest.fixture(scope="session")
def next_runs(next_artifacts, next_images):
    """next_runs(name, backend, batch) -> RunOutput (greedy, no stop token), cached."""
    def get(name: str, backend: str, batch: int):
        key = (name, backend, batch)
        if key not in _RUNS:
            from sparsevlm.runtime import Pipeline
            path = next_artifacts(name)
            if (path, backend) not in _PIPELINES:
                _PIPELINES[(path, backend)] = Pipeline.load(path, backend=backend, threads=1)
            pipe = _PIPELINES[(path, backend)]
            _RUNS[key] = pipe.generate(next_images[:batch], PROMPTS[:batch], max_new_tokens=NEW_TOKENS,
                                       stop_token_ids=())
        return _RUNS[key]
    return get


def encode(processor, image, prompt=RAW_PROMPT):
    return processor(images=[image], text=[prompt], return_tensors="pt")


