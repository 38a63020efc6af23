"""LLaVA-NeXT (anyres): every method on a tiny random LlavaNextForConditionalGeneration whose
images take 3 or 5 CLIP tiles and whose visual count changes with each image's size.

Independent expectations: transformers' own processor (image-token counts), its
`pack_image_features` (the packed, unpadded layout with newlines), its greedy generation
(tokens and logits of method none), its eager CLIP attentions (FasterVLM's per-tile top-k by
a loop over tiles) and the toolkit's batch-1 runs (a batch row computes its batch-1 result).
The exported graphs are checked against the PyTorch method (torch == onnxruntime) and
against the optimization profiles `sparsevlm-build` would build.

The model has 8 decoder layers (export time), so SparseVLM runs with explicit prune layers
(v1.5: 2, 4, 6; v1.0: 2, 4, 5, 6): the per-row keep-count rules are those of the default layers.
"""

from __future__ import annotations


import numpy as np
import pytest
import torch

from export_helpers import assert_calls_fit_profiles, assert_same_decisions

pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")

from sparsevlm.export import profiles as profile_lib  # noqa: E402
from sparsevlm.methods import SparseLlava, SparseVLMConfig  # noqa: E402
from sparsevlm.methods.accounting import layer_flops  # noqa: E402
from sparsevlm.methods.anyres import layout_for, vision_inputs  # noqa: E402
from sparsevlm.methods.config import V15_SCHEDULES  # noqa: E402
from sparsevlm.methods.spec import ModelSpec  # noqa: E402
from sparsevlm.runtime import Pipeline  # noqa: E402

from next_helpers import (IMAGE_SIZES, METHODS, NEW_TOKENS, NUM_LAYERS, PROMPTS, PRUNING, RAW_PROMPT,  # noqa: F401
                          encode, hf_next, method_config, next_artifacts, next_dir, next_images, next_processor,
                          next_runs)

pytestmark = pytest.mark.usefixtures("torch_single_thread")


# ------------------------------------------------------------------------------------------
# The layout against transformers


@pytest.mark.parametrize("size", [(100, 170), (170, 100), (150, 150), (90, 160), (40, 300), (300, 41), (84, 84),
                                  (500, 333)])
def test_visual_count_is_the_processors_image_token_count(size, hf_next, next_processor):
    from PIL import Image
    spec = ModelSpec.from_hf_config(hf_next.config)
    enc = encode(next_processor, Image.new("RGB", size[::-1], (120, 30, 200)))
    assert tuple(enc["image_sizes"][0].tolist()) == size
    expected = int((enc["input_ids"] == hf_next.config.image_token_id).sum())
    layout = layout_for(spec, size)
    assert layout.count == expected
    assert spec.min_visual <= layout.count <= spec.num_visual


def test_gather_index_reproduces_pack_image_features(hf_next, next_images, next_processor):
    """Features numbered by (tile, patch) through the host's index equal what transformers'
    pack_image_features makes of them (unpadding, newlines), for a batch of three sizes."""
    spec = ModelSpec.from_hf_config(hf_next.config)
    encoded = [encode(next_processor, image) for image in next_images]
    from sparsevlm.methods.anyres import stack_pixel_values
    pixels = stack_pixel_values([e["pixel_values"] for e in encoded])
    sizes = [tuple(e["image_sizes"][0].tolist()) for e in encoded]
    inputs, counts = vision_inputs(spec, pixels, sizes)
    tiles = [layout_for(spec, size).tiles for size in sizes]
    assert inputs["tiles"].shape[0] == sum(tiles)
    dim = 3
    per_tile = spec.tile_tokens
    numbered = torch.arange(sum(tiles) * per_tile * dim, dtype=torch.float32).view(sum(tiles), per_tile, dim)
    newline = torch.tensor([-1.0, -2.0, -3.0])
    table = torch.cat([numbered.flatten(0, 1), newline[None]])
    ours = table[inputs["image_index"]]
    packed, lengths = hf_next.model.pack_image_features(list(torch.split(numbered, tiles)), torch.tensor(sizes),
                                                        "default", image_newline=newline)
    assert lengths.tolist() == counts
    for row, expected in enumerate(packed):
        assert torch.equal(ours[row, :counts[row]], expected)
        assert not inputs["image_valid"][row, counts[row]:].any()
    assert len(set(counts)) == 3


# ------------------------------------------------------------------------------------------
# PyTorch method against transformers and against its own batch-1 runs


def test_none_matches_transformers_greedy(hf_next, next_processor, next_images):
    vlm = SparseLlava(hf_next, SparseVLMConfig(method="none"), next_processor)
    enc = encode(next_processor, next_images[0])
    with torch.no_grad():
        reference = hf_next.generate(**enc, max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True,
                                     return_dict_in_generate=True)
    ours = vlm.generate(enc["input_ids"], enc["pixel_values"], max_new_tokens=NEW_TOKENS,
                        image_sizes=enc["image_sizes"])
    assert ours.sequences[0].tolist() == reference.sequences[0, enc["input_ids"].shape[1]:].tolist()
    diff = (torch.tensor(ours.trace["logits_last"][0]) - reference.logits[0][0]).abs().max()
    assert diff <= 1e-4


@pytest.mark.parametrize("name", PRUNING)
def test_batch_rows_compute_their_batch1_result(name, hf_next, next_processor, next_images):
    vlm = SparseLlava(hf_next, method_config(name), next_processor)
    batch = vlm.prepare(next_images, PROMPTS)
    together = vlm.generate(**batch, max_new_tokens=NEW_TOKENS)
    for row in range(3):
        alone = vlm.generate(**vlm.prepare(next_images[row:row + 1], PROMPTS[row:row + 1]),
                             max_new_tokens=NEW_TOKENS)
        assert together.sequences[row].tolist() == alone.sequences[0].tolist(), f"row {row}"
        for a, b in zip(together.trace["layers"], alone.trace["layers"]):
            assert a["kept_indices"][row] == b["kept_indices"][0] and a["keep_count"][row] == b["keep_count"][0]
        diff = np.abs(np.asarray(together.trace["logits_last"][row]) - np.asarray(alone.trace["logits_last"][0]))
        assert diff.max() <= 1e-4


def image_counts(spec, sizes):
    return [layout_for(spec, size).count for size in sizes]


def test_keep_counts_scale_with_each_rows_visual_count(hf_next, next_processor, next_images):
    """v1.5: round(schedule * N / 576) at the first pruning layer; FastV: round(N * (1 - R));
    FasterVLM: k per tile plus every newline, at most; the accounting's unpruned FLOPs from N."""
    spec = ModelSpec.from_hf_config(hf_next.config)
    counts = image_counts(spec, IMAGE_SIZES)
    outputs = {}
    for name in ("sparsevlm_v15_b192", "fastv_R0.5", "fastervlm_r0.9"):
        vlm = SparseLlava(hf_next, method_config(name), next_processor)
        prepared = vlm.prepare(next_images, PROMPTS)
        outputs[name] = vlm.generate(**prepared, max_new_tokens=1)
    v15 = outputs["sparsevlm_v15_b192"].trace["layers"][0]
    assert v15["keep_count"] == [round(V15_SCHEDULES[192][0] * n / 576) for n in counts]
    fastv = outputs["fastv_R0.5"].trace["layers"][0]
    assert fastv["keep_count"] == [round(n * 0.5) for n in counts]
    fastervlm = outputs["fastervlm_r0.9"].trace["layers"][0]
    per_tile = round(spec.tile_tokens * 0.1)
    for size, kept in zip(IMAGE_SIZES, fastervlm["keep_count"]):
        layout = layout_for(spec, size)
        newlines = layout.rows[1] - layout.rows[0]
        assert newlines + per_tile <= kept <= newlines + per_tile * layout.tiles
    # the processor expanded each image to its N tokens: the rest of the prompt is text
    accounting = outputs["fastv_R0.5"].accounting["rows"]
    for row, n in enumerate(counts):
        text = len(prepared["input_ids"][row]) - n
        assert accounting[row]["flops_unpruned"] == NUM_LAYERS * layer_flops(text + n, spec.hidden_size,
                                                                             spec.intermediate_size)
        assert accounting[row]["visual_per_layer_input"][:2] == [n, n]  # FastV prunes after layer K-1 = 1


def test_fastervlm_per_tile_selection_is_a_loop_over_tiles(next_dir, next_processor, next_images):
    """Top-k of each tile's [CLS] attention (eager CLIP attentions of the feature layer), by a
    plain loop over tiles, packed by transformers' pack_image_features with the newline as
    kept: the kept ids the method reports, for each image of a batch of three sizes."""
    from transformers import LlavaNextForConditionalGeneration
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    eager = LlavaNextForConditionalGeneration.from_pretrained(str(next_dir), dtype=torch.float32,
                                                              attn_implementation="eager").eval()
    vlm = SparseLlava(eager, method_config("fastervlm_r0.9"), next_processor)
    traced = vlm.generate(**vlm.prepare(next_images, PROMPTS), max_new_tokens=1).trace["layers"][0]
    config = eager.config
    per_tile = (config.vision_config.image_size // config.vision_config.patch_size) ** 2
    keep = round(per_tile * (1 - 0.9))
    for row, image in enumerate(next_images):
        enc = encode(next_processor, image)
        tiles = image_size_to_num_patches(enc["image_sizes"][0], config.image_grid_pinpoints,
                                          config.vision_config.image_size)
        with torch.no_grad():
            out = eager.model.vision_tower(enc["pixel_values"][0, :tiles], output_attentions=True)
        cls = out.attentions[config.vision_feature_layer][:, :, 0, 1:].mean(dim=1)  # [tiles, patches]
        mask = torch.zeros(tiles, per_tile, 1)
        for tile in range(tiles):
            mask[tile, torch.topk(cls[tile], keep).indices, 0] = 1.0
        packed, _ = eager.model.pack_image_features([mask], enc["image_sizes"], "default",
                                                    image_newline=torch.ones(1))
        expected = packed[0][:, 0].nonzero().flatten().tolist()
        assert traced["kept_indices"][row] == expected, f"row {row}"


# ------------------------------------------------------------------------------------------
# Exported graphs: onnxruntime against transformers and against the PyTorch method


def test_none_export_onnxruntime_matches_transformers(next_artifacts, hf_next, next_processor, next_images):
    pipe = Pipeline.load(next_artifacts("none"), backend="onnxruntime", threads=1)
    for image in next_images[:2]:  # non-square images
        enc = encode(next_processor, image)
        with torch.no_grad():
            reference = hf_next.generate(**enc, max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True,
                                         return_dict_in_generate=True)
        from sparsevlm.methods.generation import SamplingParams
        out = pipe.generate_ids(enc["input_ids"].tolist(), enc["pixel_values"], SamplingParams(NEW_TOKENS),
                                image_sizes=enc["image_sizes"])
        assert out.sequences[0].tolist() == reference.sequences[0, enc["input_ids"].shape[1]:].tolist()
        diff = (torch.tensor(out.trace["logits_last"][0]) - reference.logits[0][0]).abs().max()
        assert diff <= 1e-4


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("name", PRUNING)
def test_torch_equals_onnxruntime(name, batch, next_runs):
    ort, reference = next_runs(name, "onnxruntime", batch), next_runs(name, "torch", batch)
    assert_same_decisions(ort.trace, reference.trace, steps=NEW_TOKENS)  # batch 3: three visual counts


# ------------------------------------------------------------------------------------------
# Optimization profiles (what sparsevlm-build gives TensorRT) hold every call


@pytest.mark.parametrize("name", list(METHODS))
def test_every_graph_call_fits_its_profile(name, next_artifacts, next_images):
    pipe = Pipeline.load(next_artifacts(name), backend="onnxruntime", threads=1)
    for batch in (1, 3):  # batch 3: three images of different sizes, so three visual counts
        assert_calls_fit_profiles(pipe, next_images[:batch], PROMPTS[:batch])


def test_profiles_span_the_pinpoints_visual_counts(next_artifacts, hf_next):
    spec = ModelSpec.from_hf_config(hf_next.config)
    manifest = Pipeline.load(next_artifacts("fastv_R0.5"), backend="onnxruntime", threads=1).artifact.manifest
    (vision,) = manifest["graphs"]["vision"]["profiles"]
    assert vision["visual_len"] == [spec.min_visual, spec.num_visual, spec.num_visual]
    assert vision["tiles"][2] == profile_lib.SHARED_RANGES["batch"][2] * spec.max_tiles
    (segment0,) = manifest["graphs"]["segment_0"]["profiles"]
    assert segment0["visual_len"] == vision["visual_len"]
    assert ModelSpec.from_json(manifest["model"]) == spec


# ------------------------------------------------------------------------------------------
# Calibration learns buckets for the varying visual counts


def test_calibration_buckets_serve_every_images_widths(next_dir, next_artifacts, next_images, tmp_path):
    """sparsevlm-calibrate on images of several sizes: each sample's widths are its own image's
    (v1.5 scaled to N), the buckets hold every width, and an export with them (the exporter's
    check and profile functions) serves a run of all three images."""
    import json

    from sparsevlm.calibration import calibrate
    from sparsevlm.export.exporter import calibration_buckets
    from sparsevlm.methods.loading import load_model
    from sparsevlm.methods.profiles import select_profile
    from sparsevlm.runtime.artifact import Artifact

    name = "sparsevlm_v15_b192"
    for i, image in enumerate(next_images):
        image.save(tmp_path / f"image_{i}.png")
    lines = [json.dumps({"image": f"image_{i}.png", "prompt": prompt}) for i in range(3) for prompt in PROMPTS]
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")
    result = calibrate(str(next_dir), method_config(name), str(tmp_path / "data.jsonl"), tmp_path / "calibration",
                       max_profiles=3, coverage=1.0, batch_size=9, progress=False, report=False)
    spec = ModelSpec.from_hf_config(load_model(str(next_dir))[0].config)
    widths = {}
    for record in result.records:
        n = record["layers"][0]["visual_in"]
        assert n == layout_for(spec, IMAGE_SIZES[record["index"] // len(PROMPTS)]).count  # its image's count
        first = record["layers"][0]
        assert first["keep_count"] == round(300 * n / 576)
        for segment in record["segments"][1:]:
            widths.setdefault(segment["index"], set()).add(segment["visual_width"])
    assert len(widths[1]) >= 3  # three image sizes, three widths
    artifact = Artifact.load(next_artifacts(name))
    torch_model, _ = load_model(str(next_dir))
    buckets = calibration_buckets(result.calibration_path, artifact.plan, torch_model)
    for index, segment_widths in widths.items():
        ranges = [tuple(b) for b in buckets[index - 1]]
        assert all(any(lo <= w <= hi for lo, _, hi in ranges) for w in segment_widths)
        for width in segment_widths:
            select_profile(ranges, width, index)  # served (raises ProfileError otherwise)


# ------------------------------------------------------------------------------------------
# Inputs and older manifests


def test_missing_or_wrong_image_sizes_are_one_line_errors(hf_next, next_processor, next_images):
    from sparsevlm.methods.generation import InputError
    vlm = SparseLlava(hf_next, SparseVLMConfig(method="none"), next_processor)
    inputs = vlm.prepare(next_images[:1], PROMPTS[:1])
    with pytest.raises(InputError, match="^image_sizes: a LLaVA-NeXT model needs"):
        vlm.generate(inputs["input_ids"], inputs["pixel_values"], max_new_tokens=1)
    with pytest.raises(InputError, match=r"^image_sizes: expected 1 \(height, width\) pairs"):
        vlm.generate(inputs["input_ids"], inputs["pixel_values"], max_new_tokens=1, image_sizes=[(100,)])
    with pytest.raises(InputError, match=r"^pixel_values: expected shape \(1, >= 5, 3, 84, 84\)"):
        vlm.generate(inputs["input_ids"], inputs["pixel_values"][:, :3], max_new_tokens=1,  # a 5-tile image
                     image_sizes=inputs["image_sizes"])
    with pytest.raises(InputError, match=r"^pixel_values: expected shape \(1, tiles, 3, 84, 84\)"):
        vlm.generate(inputs["input_ids"], inputs["pixel_values"][:, 0], max_new_tokens=1,
                     image_sizes=inputs["image_sizes"])


def test_a_manifest_written_before_anyres_reads_as_llava15():
    old = {"num_layers": 22, "hidden_size": 64, "intermediate_size": 128, "vocab_size": 512, "num_visual": 576,
           "image_token_id": 4, "image_size": 336, "pad_token_id": 3, "max_position_embeddings": 2048,
           "source": "x", "config_sha256": "y"}
    spec = ModelSpec.from_json(old)
    assert spec.model_type == "llava" and not spec.anyres
    assert spec.tile_tokens == 576 and spec.min_visual == 576 and spec.max_tiles == 1


@pytest.mark.parametrize("alias, text_type, layers", [("llava-v1.6-vicuna-7b", "llama", 32),
                                                      ("llava-v1.6-vicuna-13b", "llama", 40),
                                                      ("llava-v1.6-mistral-7b", "mistral", 32)])
def test_aliases_build_the_published_next_architectures(alias, text_type, layers):
    from sparsevlm.methods.loading import load_config
    from sparsevlm.methods.modeling import check_config
    config, location = load_config(alias, random_weights=True)
    assert location == f"llava-hf/{alias}-hf" and config.model_type == "llava_next"
    check_config(config)  # supported as it is (Mistral: no sliding window)
    assert config.text_config.model_type == text_type and config.text_config.num_hidden_layers == layers
    spec = ModelSpec.from_hf_config(config)
    # 672x672 on LLaVA-v1.6's pinpoints: 576 + 48 x 49 tokens, the most any image gets
    assert spec.anyres and spec.num_visual == 2928 and spec.vocab_size == 32064 and spec.image_token_id == 32000
    assert layout_for(spec, (672, 672)).count == 2928 and spec.max_tiles == 5
