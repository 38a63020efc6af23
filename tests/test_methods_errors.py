"""Bad input gets a clear error of a documented type whose message names the input."""

from __future__ import annotations

import pytest
import torch

from sparsevlm.methods import ConfigError, InputError, SparseLlava, SparseVLMConfig

pytestmark = pytest.mark.usefixtures("torch_single_thread")


@pytest.fixture(scope="module")
def vlm(make_vlm):
    return make_vlm(SparseVLMConfig(method="sparsevlm", budget=192))


@pytest.fixture(scope="module")
def good(encoded):
    ids, pixels = encoded[0]
    return ids[0].tolist(), pixels


def test_prompt_without_image_token(vlm, good):
    ids, pixels = good
    image = vlm.model.config.image_token_id
    with pytest.raises(InputError, match=r"prompt 0: no image token"):
        vlm.generate([[t for t in ids if t != image]], pixels, max_new_tokens=1)
    with pytest.raises(InputError, match=r"prompt 1: no image token"):
        vlm.generate([ids, [1, 20, 21]], torch.cat([pixels, pixels]), max_new_tokens=1)


def test_more_image_tokens_than_images(vlm, good, images):
    ids, pixels = good
    image = vlm.model.config.image_token_id
    start = ids.index(image)
    two_images = ids[:start] + [image] * 576 + [30, 31] + [image] * 576 + ids[start + 576:]
    with pytest.raises(InputError, match=r"prompt 0: more image tokens than images"):
        vlm.generate([two_images], pixels, max_new_tokens=1)
    with pytest.raises(InputError, match=r"prompt 0: more image tokens than images"):
        vlm.generate([ids[:start] + [image] * 3 + ids[start + 576:]], pixels, max_new_tokens=1)
    with pytest.raises(InputError, match=r"images/prompts"):
        vlm.prepare(images[:2], ["What is in the image?"])


@pytest.mark.parametrize("shape", [(1, 3, 224, 224), (1, 1, 336, 336), (2, 3, 336, 336), (3, 336, 336)])
def test_wrong_pixel_shape(vlm, good, shape):
    ids, _ = good
    with pytest.raises(InputError, match=r"pixel_values: expected shape \(1, 3, 336, 336\)"):
        vlm.generate([ids], torch.zeros(shape), max_new_tokens=1)


@pytest.mark.parametrize("config,pattern", [
    (SparseVLMConfig(method="sparsevlm", budget=0), r"budget: expected a positive integer, got 0"),
    (SparseVLMConfig(method="fastervlm", budget=-5), r"budget: expected a positive integer, got -5"),
    (SparseVLMConfig(method="sparsevlm", budget=600), r"budget: 600 is larger than the model's 576 visual tokens"),
    (SparseVLMConfig(method="fastv", budget=577), r"budget: 577 .*576"),
    (SparseVLMConfig(method="prune-all", budget=192), r"method: expected one of .*'prune-all'"),
    (SparseVLMConfig(method="sparsevlm", variant="v3", budget=192), r"variant: expected one of .*'v3'"),
    (SparseVLMConfig(method="sparsevlm", budget=100), r"budget: SparseVLM v1.5 has schedules for"),
    (SparseVLMConfig(method="sparsevlm", budget=192, prune_layers=(2, 6, 30)),
     r"prune_layers: layer 30 is beyond the model depth \(22 decoder layers"),
    (SparseVLMConfig(method="sparsevlm", variant="v1.0", budget=192, prune_layers=(2, 21)),
     r"prune_layers: layer 21 is beyond the model depth"),
    (SparseVLMConfig(method="fastv", K=22, R=0.5), r"K: expected 1 <= K < 22"),
    (SparseVLMConfig(method="sparsevlm", variant="paper", lam=1.5), r"lam: "),
])
def test_bad_config(hf_model, processor, config, pattern):
    with pytest.raises(ConfigError, match=pattern):
        SparseLlava(hf_model, config, processor)


def test_errors_are_value_errors():
    """Callers that catch ValueError see both kinds."""
    assert issubclass(ConfigError, ValueError) and issubclass(InputError, ValueError)
