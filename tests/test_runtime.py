"""The runtime (`sparsevlm.runtime.Pipeline`) on exported artifacts.

- torch and onnxruntime backends agree: kept positions, 32 greedy tokens, logits within
  1e-4, at batch 1 and batch 3 (different prompts); the traces validate.
- Profile selection (synthetic widths) and an end-to-end run whose profiles force padding.
- Clear errors: corrupted graph, newer manifest schema, missing plugin library, non-image.
- TensorRT: what runs without a builder/GPU; the real-engine tests skip with the reason.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from export_helpers import (EXTRA_BUDGETS, NEW_TOKENS, PRIMARY, PROMPTS, artifact_root, artifacts,  # noqa: F401
                            assert_same_decisions, inputs_images, pipelines, runs)
from sparsevlm.export.manifest import ArtifactError
from sparsevlm.methods.generation import InputError, validate_trace
from sparsevlm.runtime import Pipeline, ProfileError, load_image, select_profile
from sparsevlm.runtime.profiles import SegmentProfiles

# v1.5 budgets 128/64 at batch 3 only: batch 1 is covered by the budget-192 and other methods.
CASES = [(name, batch) for name in PRIMARY for batch in (1, 3)] + [(name, 3) for name in EXTRA_BUDGETS]


# ------------------------------------------------------------------------------------------
# Backend parity
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,batch", CASES)
def test_torch_and_onnxruntime_backends_agree(name, batch, runs):
    ref = runs(name, "torch", batch)
    ort = runs(name, "onnxruntime", batch)
    for out in (ref, ort):
        validate_trace(out.trace)
        assert len(out.token_ids) == batch
        assert all(len(row) == NEW_TOKENS for row in out.token_ids)  # no stop tokens: all 32 steps
    assert_same_decisions(ort.trace, ref.trace, steps=NEW_TOKENS)
    assert ort.token_ids == ref.token_ids
    assert ort.kept_per_layer == ref.kept_per_layer
    assert ort.texts == ref.texts
    assert [p["padded_width"] for p in ort.profiles] == [p["padded_width"] for p in ref.profiles]
    # the trace names the method that was exported
    assert ort.trace["method"]["name"] == name.split("_")[0]


def test_batch_rows_match_batch_one(runs):
    """Row 0 of the batch-3 run equals the batch-1 run (other rows are padding-independent)."""
    one, three = runs("sparsevlm_v15_b192", "onnxruntime", 1), runs("sparsevlm_v15_b192", "onnxruntime", 3)
    assert three.token_ids[0] == one.token_ids[0]
    assert [layer["kept_indices"][0] for layer in three.trace["layers"]] == \
        [layer["kept_indices"][0] for layer in one.trace["layers"]]
    np.testing.assert_allclose(three.trace["logits_last"][0], one.trace["logits_last"][0], atol=1e-4, rtol=0)


def test_rank_rule_trace_has_ranks(runs):
    out = runs("sparsevlm_v10_b192", "onnxruntime", 3)
    assert [layer["layer"] for layer in out.trace["layers"]] == [2, 6, 15, 19]
    for layer in out.trace["layers"]:
        assert all(isinstance(r, int) and r > 0 for r in layer["rank"])


# ------------------------------------------------------------------------------------------
# Profile selection
# ------------------------------------------------------------------------------------------

BUCKETS = [(10, 15, 20), (30, 40, 50), (60, 60, 60)]


@pytest.mark.parametrize("width,profile,padded", [
    (15, 0, 15), (42, 1, 42),  # inside a bucket
    (10, 0, 10), (20, 0, 20), (30, 1, 30), (50, 1, 50), (60, 2, 60),  # on an edge (min and max)
    (21, 1, 30), (29, 1, 30), (55, 2, 60),  # between buckets: pad to the next min
    (1, 0, 10), (9, 0, 10),  # below every min: pad to the smallest min
])
def test_select_profile(width, profile, padded):
    choice = select_profile(BUCKETS, width, segment=2)
    assert (choice.profile, choice.padded_width, choice.width, choice.segment) == (profile, padded, width, 2)
    assert choice.bounds == BUCKETS[profile]
    assert choice.to_json()["min_opt_max"] == list(BUCKETS[profile])


def test_select_profile_unordered_buckets_pick_nearest_larger():
    choice = select_profile([(60, 60, 60), (30, 40, 50), (10, 15, 20)], 25, segment=1)
    assert (choice.profile, choice.padded_width) == (1, 30)


@pytest.mark.parametrize("profiles,width,profile,padded", [
    ([(1, 50, 100), (1, 20, 40)], 30, 1, 30),  # overlapping: the smaller max, not the first containing
    ([(1, 50, 100), (1, 20, 40)], 41, 0, 41),  # only the wide one contains it
    ([(10, 20, 40), (10, 15, 30), (5, 5, 30)], 12, 1, 12),  # equal maxima: the first in manifest order
    ([(20, 30, 90), (20, 25, 40), (50, 60, 60)], 7, 1, 20),  # padded: among those starting at 20, max 40
])
def test_select_profile_prefers_the_cheapest_containing_profile(profiles, width, profile, padded):
    choice = select_profile(profiles, width)
    assert (choice.profile, choice.padded_width) == (profile, padded)
    # the width actually run selects the same profile again (what the TensorRT executor relies on)
    assert select_profile(profiles, choice.padded_width).profile == profile


def test_select_profile_above_every_max_is_an_error():
    with pytest.raises(ProfileError) as info:
        select_profile(BUCKETS, 61, segment=3)
    message = str(info.value)
    assert "segment 3" in message and "61" in message and "[60, 60]" in message and "[10, 20]" in message
    with pytest.raises(ProfileError, match="no optimization profiles"):
        select_profile([], 5, segment=1)


def test_planner_reads_manifest_profiles(artifacts):
    from sparsevlm.runtime.artifact import Artifact
    v15 = Artifact.load(artifacts("sparsevlm_v15_b192"))
    planner = SegmentProfiles.from_manifest(v15.manifest)
    # v1.5 widths are static: kept (schedule) + recycled after each pruning layer
    assert sorted(planner.profiles) == [1, 2, 3]
    assert [len(p) for p in planner.profiles.values()] == [1, 1, 1]
    assert [p[0][0] == p[0][2] for p in planner.profiles.values()] == [True] * 3
    assert planner.profiles[1][0][0] >= 300 and planner.profiles[2][0][0] >= 200 and planner.profiles[3][0][0] >= 110
    v10 = Artifact.load(artifacts("sparsevlm_v10_b192"))
    rank = SegmentProfiles.from_manifest(v10.manifest)
    assert sorted(rank.profiles) == [1, 2, 3, 4]
    for buckets in rank.profiles.values():  # the rank rule: buckets cover 1..576
        assert min(b[0] for b in buckets) == 1 and max(b[2] for b in buckets) == 576


def test_profile_fallback_pads_and_gives_identical_results(artifacts, inputs_images, runs):
    """Buckets that exclude the real widths force the fallback (pad to the next min); the
    padding slots are masked, so tokens, kept ids and logits do not change."""
    name = "sparsevlm_v10_b192"
    base = runs(name, "onnxruntime", 3)
    pipe = Pipeline.load(artifacts(name), backend="onnxruntime", threads=2)
    widths = [p["width"] for p in base.profiles]
    # force each segment's width between two buckets: [1, w-1] and [w+5, 700]
    pipe.profile_policy = SegmentProfiles({c["segment"]: [(1, 1, c["width"] - 1), (c["width"] + 5, c["width"] + 5, 700)]
                                           for c in base.profiles})
    out = pipe.generate(inputs_images, PROMPTS, max_new_tokens=8, stop_token_ids=())
    assert [p["width"] for p in out.profiles] == widths
    assert [p["padded_width"] for p in out.profiles] == [w + 5 for w in widths]
    assert all(p["profile"] == 1 for p in out.profiles)
    assert [layer["kept_indices"] for layer in out.trace["layers"]] == \
        [layer["kept_indices"] for layer in base.trace["layers"]]
    assert [layer["recycled"] for layer in out.trace["layers"]] == [layer["recycled"] for layer in base.trace["layers"]]
    assert out.token_ids == [row[:8] for row in base.token_ids]
    np.testing.assert_allclose(out.trace["logits_last"], base.trace["logits_last"], atol=1e-4, rtol=0)
    # and above every max is a clear error, not a silent clamp
    pipe.profile_policy = SegmentProfiles({segment: [(1, 1, 2)] for segment in pipe.profile_policy.profiles})
    with pytest.raises(ProfileError, match="segment 1: visual width"):
        pipe.generate(inputs_images[:1], PROMPTS[:1], max_new_tokens=1)


# ------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------

@pytest.fixture
def artifact_copy(artifacts, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(artifacts("sparsevlm_v15_b192"), target)
    return target


def test_corrupted_graph_is_a_checksum_error(artifact_copy):
    graph = artifact_copy / "segment_1.onnx"
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0xFF
    graph.write_bytes(bytes(data))
    with pytest.raises(ArtifactError) as info:
        Pipeline.load(artifact_copy, backend="onnxruntime")
    message = str(info.value)
    assert "segment_1.onnx" in message and "checksum" in message
    assert "\n" not in message


def test_newer_manifest_schema_is_refused(artifact_copy):
    path = artifact_copy / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["schema"] = "sparsevlm-artifact/99"
    path.write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError) as info:
        Pipeline.load(artifact_copy, backend="onnxruntime")
    message = str(info.value)
    assert "99" in message and "newer" in message and "manifest.json" in message


def test_missing_manifest_is_refused(artifact_copy):
    (artifact_copy / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match="no manifest.json"):
        Pipeline.load(artifact_copy, backend="onnxruntime")


def test_unknown_backend(artifacts):
    with pytest.raises(ValueError, match="backend: expected one of"):
        Pipeline.load(artifacts("fastervlm_b64"), backend="openvino")


def test_missing_plugin_library_names_the_path():
    from sparsevlm.trt_plugins import find_plugin_library
    with pytest.raises(FileNotFoundError) as info:
        find_plugin_library("/nonexistent.so")
    assert "/nonexistent.so" in str(info.value) and "plugin library" in str(info.value)


def test_not_an_image_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="not a decodable image"):
        load_image(b"not an image")
    fake = tmp_path / "fake.png"
    fake.write_bytes(b"not an image either")
    with pytest.raises(InputError, match="fake.png"):
        load_image(fake)
    with pytest.raises(InputError, match="does not exist"):
        load_image(tmp_path / "missing.png")
    assert issubclass(InputError, ValueError)


def test_generate_rejects_non_image_input(pipelines, artifacts):
    pipe = pipelines(artifacts("fastervlm_b64"), "onnxruntime")
    with pytest.raises(InputError, match="image bytes"):
        pipe.generate([b"\x89PNG but truncated"], ["What is this?"], max_new_tokens=1)


# ------------------------------------------------------------------------------------------
# TensorRT
# ------------------------------------------------------------------------------------------

def _tensorrt_importable() -> bool:
    try:
        import tensorrt  # noqa: F401
        return True
    except ImportError:
        return False


def test_tensorrt_backend_without_tensorrt_or_engines_is_a_clear_error(artifacts):
    """Here: no `tensorrt` package, or no GPU, or no engines (no sparsevlm-build run) — each a
    RuntimeError naming what is missing."""
    with pytest.raises(RuntimeError) as info:
        Pipeline.load(artifacts("fastervlm_b64"), backend="tensorrt")
    message = str(info.value)
    assert message.startswith("tensorrt backend:")
    if not _tensorrt_importable():
        assert "not installed" in message and "tensorrt" in message
    elif not torch.cuda.is_available():
        assert "no CUDA device" in message
    else:
        assert "no engines" in message and "sparsevlm-build" in message


def test_graph_names_and_profile_tables(artifacts):
    from sparsevlm.runtime.artifact import Artifact
    from sparsevlm.runtime.backends import graph_names
    art = Artifact.load(artifacts("sparsevlm_v15_b192"))
    assert graph_names(art) == ["vision", "segment_0", "segment_1", "segment_2", "segment_3", "decode"]
    assert graph_names(Artifact.load(artifacts("fastervlm_b64"))) == ["vision", "segment_0", "decode"]
    graphs = art.manifest["graphs"]
    for name in graph_names(art):
        profiles = graphs[name]["profiles"]
        assert profiles, name
        dynamic = {d for io in graphs[name]["inputs"] for d in io["shape"] if isinstance(d, str)}
        for profile in profiles:  # every dynamic input dimension has a [min, opt, max] range
            assert dynamic <= set(profile), (name, dynamic - set(profile))
            for low, opt, high in profile.values():
                assert 0 <= low <= opt <= high
    for segment in art.manifest["segments"][1:]:
        assert segment["profile_dim"] == "visual_width"


@pytest.mark.skipif(not _tensorrt_importable(), reason="needs the `tensorrt` Python package (TensorRT >= 10.7) "
                    "to build and run engines; not installed here")
@pytest.mark.skipif(not torch.cuda.is_available(), reason="TensorRT engines need a CUDA GPU; none is available")
def test_tensorrt_engines_match_onnxruntime(artifacts, tmp_path, inputs_images, runs):
    pytest.importorskip("tensorrt", reason="needs TensorRT")
    from sparsevlm.trt_plugins import find_plugin_library
    try:
        find_plugin_library()
    except FileNotFoundError as error:
        pytest.skip(f"the sparsevlm TensorRT plugin library is not built: {error}")
    try:
        from sparsevlm.export.trt_build import build_engines  # written by sparsevlm-build's module
    except ImportError as error:
        pytest.skip(f"sparsevlm-build is not available: {error}")
    target = tmp_path / "trt"
    shutil.copytree(artifacts("sparsevlm_v15_b192"), target)
    build_engines(target)
    pipe = Pipeline.load(target, backend="tensorrt")
    out = pipe.generate(inputs_images, PROMPTS, max_new_tokens=NEW_TOKENS, stop_token_ids=())
    ref = runs("sparsevlm_v15_b192", "onnxruntime", 3)
    assert_same_decisions(out.trace, ref.trace, atol=1e-3)


# ------------------------------------------------------------------------------------------
# ONNX Runtime sessions
# ------------------------------------------------------------------------------------------

def _allows_spinning(session) -> bool:
    try:
        return session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") != "0"
    except Exception:  # not set: ONNX Runtime's default, which spins
        return True


def test_onnxruntime_prefill_sessions_do_not_spin_and_decode_does(artifacts):
    """The vision and segment sessions run back to back, each with its own thread pool: a
    finished session's spinning workers would hold the cores the next one needs."""
    from sparsevlm.runtime.artifact import Artifact
    from sparsevlm.runtime.backends import OnnxRuntimeExecutor, graph_names
    artifact = Artifact.load(artifacts("sparsevlm_v15_b64"))
    executor = OnnxRuntimeExecutor(artifact, threads=2)
    assert list(executor.sessions) == graph_names(artifact)
    assert {name: _allows_spinning(s) for name, s in executor.sessions.items()} == \
        {name: name == "decode" for name in graph_names(artifact)}


def test_onnxruntime_executor_without_decode_prefills_the_same(artifacts, inputs_images, runs):
    """`graphs=` loads a subset (a prefill-only benchmark leaves out decode and its copy of
    the weights); the prefill is the full executor's: same kept tokens, same logits."""
    from sparsevlm.runtime.artifact import Artifact
    from sparsevlm.runtime.backends import OnnxRuntimeExecutor, graph_names
    artifact = Artifact.load(artifacts("sparsevlm_v15_b64"))
    graphs = [name for name in graph_names(artifact) if name != "decode"]
    pipe = Pipeline(artifact, OnnxRuntimeExecutor(artifact, threads=2, graphs=graphs), "onnxruntime")
    assert "decode" not in pipe.executor.sessions
    out = pipe.generate(inputs_images[:3], PROMPTS[:3], max_new_tokens=1, stop_token_ids=())
    full = runs("sparsevlm_v15_b64", "onnxruntime", 3)
    assert_same_decisions(out.trace, full.trace, steps=1)
