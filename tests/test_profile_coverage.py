"""Every graph call of a real run fits an optimization profile of that graph, as
`sparsevlm-build` would build it (`plan_engines(manifest)`: each input's min/max shapes).

A recording executor wraps the ONNX Runtime executor and keeps, for every call of every
graph, the shape of each graph input, plus the profile the TensorRT executor would run it
in: `profile_for_shapes` (the pure function `TensorRTExecutor` calls) over the engine
profiles `sparsevlm-build` builds and the recorded shapes. Then:

- vision, segment 0 and decode: some profile of the graph contains the call;
- a segment that starts by pruning: the profile found from the shapes contains the call (all
  inputs: `visual_in`/`seq_in` come from the previous segment, `visual_width` from the
  bucket), and it is the choice the runtime's profile rule reported in the run output (so
  the executor, from the shapes alone, and the runtime agree);
- decode at the real new-token bound (`MAX_NEW_TOKENS`): runs here stop after a few tokens;
  every decode call of a run sees the same cache buffers, at their capacity (the prefill
  width + new tokens - 1, asserted), so the call of a `MAX_NEW_TOKENS` generation is the
  recorded one with the capacity grown by the difference in new tokens, and each
  `past_len_<s>` maximum must equal the largest cache segment s can hold: the longest prefix
  and text, the widest visual region segment s's layers run at (the vision width for s = 0,
  else the widest bucket of segment s) and the new tokens.

Every method runs, at batch 1 and at batch 3 (prompts of different lengths). The rank rules
run with the default buckets and with buckets calibrated on the demo model the way
`sparsevlm-calibrate` does it. The calibrated artifacts differ from the default ones only in
their profiles (the graphs do not depend on the buckets), so they are the default export
with its profiles recomputed from `calibration.json` by the exporter's own functions; the
test checks that this recomputation with the default buckets reproduces the exported
manifest exactly.
"""

from __future__ import annotations

import copy
import json
import threading

import pytest

from export_helpers import (PROMPTS, RecordingExecutor, artifact_root, artifacts, engine_profiles,  # noqa: F401
                            inputs_images, pipelines)

pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")

from sparsevlm.calibration import calibrate  # noqa: E402
from sparsevlm.export import profiles as profile_lib  # noqa: E402
from sparsevlm.export.exporter import calibration_buckets, export  # noqa: E402
from sparsevlm.export.trt_build import plan_engines  # noqa: E402
from sparsevlm.methods.loading import load_model  # noqa: E402
from sparsevlm.methods.profiles import profile_for_shapes  # noqa: E402
from sparsevlm.runtime import Pipeline  # noqa: E402
from sparsevlm.runtime.artifact import Artifact  # noqa: E402

NEW_TOKENS = 4  # decode calls at steps 0..2 (caches of capacity prefill + 3); the real bound by extrapolation
BATCHES = (1, 3)

# Exported by tests/export_helpers.py (shared with the export and runtime tests).
SHARED_EXPORTS = ["sparsevlm_v15_b192", "sparsevlm_v15_b128", "sparsevlm_v15_b64", "sparsevlm_v10_b192",
                  "fastv_R0.5", "fastervlm_b64"]
# Exported here, once per session (keyword arguments of sparsevlm.export.export).
OWN_EXPORTS = {
    "none": dict(method="none", budgets=None),
    "sparsevlm_v15_b96": dict(method="sparsevlm", variant="v1.5", budgets=[96]),
    "sparsevlm_paper": dict(method="sparsevlm", variant="paper", budgets=None, lam=0.5),
}
# Calibrated configuration -> the default-bucket export it shares its graphs with.
CALIBRATED = {"sparsevlm_v10_b192_calibrated": "sparsevlm_v10_b192",
              "sparsevlm_paper_calibrated": "sparsevlm_paper"}
CONFIGURATIONS = ["none", "sparsevlm_v15_b192", "sparsevlm_v15_b128", "sparsevlm_v15_b96", "sparsevlm_v15_b64",
                  "sparsevlm_v10_b192", "sparsevlm_v10_b192_calibrated", "sparsevlm_paper",
                  "sparsevlm_paper_calibrated", "fastv_R0.5", "fastervlm_b64"]

_OWN_ARTIFACTS: dict = {}
_CALIBRATED_PIPELINES: dict = {}


# ------------------------------------------------------------------------------------------
# Recording


def recorded_run(pipe: Pipeline, images, prompts):
    """(RunOutput, calls) of a greedy run of NEW_TOKENS steps with no stop token."""
    recorder = RecordingExecutor(pipe.executor, pipe.artifact.manifest)
    recording = Pipeline(pipe.artifact, recorder, pipe.backend)
    out = recording.generate(images, prompts, max_new_tokens=NEW_TOKENS, temperature=0.0, stop_token_ids=())
    # The profile the TensorRT executor picks for each call (None: no profile holds it).
    profiles = engine_profiles(pipe.artifact.manifest)
    calls = [{"graph": graph, "shapes": shapes, "profile": profile_for_shapes(profiles[graph], shapes)}
             for graph, shapes in recorder.calls[threading.get_ident()]]
    return out, calls


# ------------------------------------------------------------------------------------------
# Profile checks (against plan_engines: what sparsevlm-build gives TensorRT)


def outside(profile, shapes: dict) -> list[str]:
    """Why a call does not fit one profile (empty: it fits)."""
    problems = []
    for spec in profile:
        shape = shapes[spec.name]
        if len(shape) != len(spec.min):
            problems.append(f"{spec.name} has rank {len(shape)}, the profile {len(spec.min)}")
            continue
        for dim, (low, value, high) in enumerate(zip(spec.min, shape, spec.max)):
            if not low <= value <= high:
                problems.append(f"{spec.name}{list(shape)} dim {dim} = {value} outside [{low}, {high}]")
    return problems


def call_problems(plans: dict, call: dict, pruning_graphs: set) -> list[str]:
    graph, shapes = call["graph"], call["shapes"]
    profiles = plans[graph].profiles
    if graph in pruning_graphs:
        chosen = call["profile"]
        if chosen is None:
            return [f"{graph}: no profile holds the call {shapes}"]
        problems = outside(profiles[chosen], shapes)
        return [f"{graph} in its chosen profile {chosen}: {p}" for p in problems]
    if any(not outside(profile, shapes) for profile in profiles):
        return []
    return [f"{graph} in profile {i}: {p}" for i, profile in enumerate(profiles) for p in outside(profile, shapes)]


def past_len_axes(manifest: dict) -> dict:
    """decode input -> its axes named `past_len_<s>` (the cache lengths)."""
    axes = {}
    for spec in manifest["graphs"]["decode"]["inputs"]:
        cache_axes = [axis for axis, dim in enumerate(spec["shape"]) if str(dim).startswith("past_len_")]
        if cache_axes:
            axes[spec["name"]] = cache_axes
    return axes


def last_decode_call(manifest: dict, decode_calls: list[dict], max_new_tokens: int) -> dict:
    """A decode call of a `max_new_tokens` generation, from the recorded ones of a
    NEW_TOKENS generation: every call sees the same cache capacity (asserted), the prefill
    width + new tokens - 1 (the first token comes from the prefill, the last one is never
    fed back), so it grows by the difference in new tokens."""
    axes = past_len_axes(manifest)
    first = decode_calls[0]["shapes"]
    for step, call in enumerate(decode_calls):
        assert call["shapes"] == first, f"decode step {step}: the cache shapes changed"
    grown = dict(first)
    for name, cache_axes in axes.items():
        shape = list(first[name])
        for axis in cache_axes:
            shape[axis] += max_new_tokens - NEW_TOKENS
        grown[name] = tuple(shape)
    return {"graph": "decode", "shapes": grown, "profile": None}


def cached_visual_widths(calls: list[dict]) -> list[int]:
    """Per segment, the visual tokens its KV cache holds after the prefill: the decode
    cache's capacity minus the room for the new tokens (NEW_TOKENS - 1) and the prompt's
    prefix and text regions."""
    first_segment = next(c for c in calls if c["graph"] == "segment_0")["shapes"]
    prompt = first_segment["prefix_ids"][1] + first_segment["text_ids"][1]
    first_decode = next(c for c in calls if c["graph"] == "decode")["shapes"]
    segments = sorted(int(name.split(".")[1]) for name in first_decode if name.startswith("key_valid."))
    return [first_decode[f"key_valid.{s}"][1] - (NEW_TOKENS - 1) - prompt for s in segments]


def own_visual_width_max(manifest: dict, plan, segment: int) -> int:
    """The widest visual region segment `segment`'s layers run at, so hold in their cache:
    the vision graph's width for segment 0, else the widest visual width the planner can
    choose for the segment (its profiles' `visual_width` maxima)."""
    if segment == 0:
        return vision_width(plan)
    return max(p["visual_width"][2] for p in manifest["graphs"][f"segment_{segment}"]["profiles"])


# ------------------------------------------------------------------------------------------
# Fixtures: the artifacts and pipelines of every configuration


@pytest.fixture(scope="module")
def own_artifacts(demo_dir, artifact_root):  # noqa: F811
    def get(name: str):
        if name not in _OWN_ARTIFACTS:
            out = artifact_root / name
            export(str(demo_dir), out, progress=False, **OWN_EXPORTS[name])
            _OWN_ARTIFACTS[name] = out
        return _OWN_ARTIFACTS[name]
    return get


def write_calibration_set(folder, images, prompts) -> str:
    """A JSONL calibration set ({"image", "prompt"} per line, as sparsevlm-calibrate reads):
    each (image i, prompt i) pair the runs below use, and image i + 1 with prompt i."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        image.save(folder / f"image_{i}.png")
    lines = [json.dumps({"image": f"image_{(p + shift) % len(images)}.png", "prompt": prompt})
             for p, prompt in enumerate(prompts) for shift in (0, 1)]
    path = folder / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def vision_width(plan) -> int:
    return plan.fastervlm_keep if plan.method == "fastervlm" else plan.num_visual


def profiles_for_buckets(artifact: Artifact, buckets) -> dict:
    """{graph: profiles} as the exporter computes them for this plan and these buckets."""
    return profile_lib.graph_profiles(artifact.plan, len(artifact.manifest["segments"]), vision_width(artifact.plan),
                                      buckets)


@pytest.fixture(scope="module")
def pipeline_of(artifacts, own_artifacts, pipelines, demo_dir, inputs_images, tmp_path_factory):  # noqa: F811
    def get(name: str) -> Pipeline:
        if name in SHARED_EXPORTS:
            return pipelines(artifacts(name), "onnxruntime")
        if name in OWN_EXPORTS:
            return pipelines(own_artifacts(name), "onnxruntime")
        if name in _CALIBRATED_PIPELINES:
            return _CALIBRATED_PIPELINES[name]
        base = get(CALIBRATED[name])
        folder = tmp_path_factory.mktemp(name)
        data = write_calibration_set(folder / "data", inputs_images, PROMPTS)
        result = calibrate(str(demo_dir), base.artifact.plan.config, data, folder / "calibration",
                           max_profiles=3, coverage=1.0, batch_size=6, progress=False, report=False)
        torch_model, _ = load_model(str(demo_dir))
        # what sparsevlm-export --calibration takes from the file (checked against model and method)
        buckets = calibration_buckets(result.calibration_path, base.artifact.plan, torch_model)
        assert any(len(b) > 1 for b in buckets), "the calibration should give some segment several profiles"
        manifest = copy.deepcopy(base.artifact.manifest)
        for graph, profiles in profiles_for_buckets(base.artifact, buckets).items():
            manifest["graphs"][graph]["profiles"] = profiles
        _CALIBRATED_PIPELINES[name] = Pipeline(Artifact(base.artifact.root, manifest, base.artifact.plan),
                                               base.executor, base.backend)
        return _CALIBRATED_PIPELINES[name]
    return get


# ------------------------------------------------------------------------------------------
# Tests


@pytest.mark.parametrize("name", list(CALIBRATED.values()))
def test_profile_recomputation_reproduces_the_export(name, pipeline_of):
    """The calibrated manifests below are recomputed with the exporter's functions; with the
    default buckets that recomputation gives exactly the exported profiles."""
    artifact = pipeline_of(name).artifact
    recomputed = profiles_for_buckets(artifact, profile_lib.default_buckets(artifact.plan))
    assert recomputed == {graph: artifact.manifest["graphs"][graph]["profiles"] for graph in recomputed}


@pytest.mark.parametrize("name", CONFIGURATIONS)
def test_every_graph_call_fits_its_profile(name, pipeline_of, inputs_images):  # noqa: F811
    pipe = pipeline_of(name)
    manifest = pipe.artifact.manifest
    plans = {p.name: p for p in plan_engines(manifest)}
    pruning_graphs = {s["graph"] for s in manifest["segments"] if s["profile_dim"]}
    problems = []
    for batch in BATCHES:
        out, calls = recorded_run(pipe, inputs_images[:batch], PROMPTS[:batch])
        graphs = [c["graph"] for c in calls]
        assert graphs == ["vision"] + [s["graph"] for s in manifest["segments"]] + ["decode"] * (NEW_TOKENS - 1)
        for call in calls:
            problems += [f"batch {batch}: {p}" for p in call_problems(plans, call, pruning_graphs)]
        # the profile the TensorRT executor finds from the shapes is the choice the run output reports
        chosen = {c["graph"]: c["profile"] for c in calls if c["graph"] in pruning_graphs}
        assert chosen == {f"segment_{c['segment']}": c["profile"] for c in out.profiles}
        # each segment caches the visual region its own layers ran at (the premise of the
        # past_len ranges): the vision width for segment 0, the width run for the others
        vision_tokens = next(c for c in calls if c["graph"] == "segment_0")["shapes"]["visual"][1]
        assert cached_visual_widths(calls) == [vision_tokens] + [c["padded_width"] for c in out.profiles]
        last = last_decode_call(manifest, [c for c in calls if c["graph"] == "decode"], profile_lib.MAX_NEW_TOKENS)
        problems += [f"batch {batch}, {profile_lib.MAX_NEW_TOKENS} new tokens: {p}"
                     for p in call_problems(plans, last, pruning_graphs)]
    assert not problems, f"{name}: graph calls outside their profiles:\n" + "\n".join(problems)


@pytest.mark.parametrize("name", CONFIGURATIONS)
def test_decode_cache_ranges_hold_each_segments_own_cache(name, pipeline_of):
    """past_len_<s> max = longest prefix + widest visual region of segment s + longest text
    + the new-token bound (the worst case no test prompt reaches)."""
    pipe = pipeline_of(name)
    manifest, plan = pipe.artifact.manifest, pipe.artifact.plan
    prefix_max, text_max = profile_lib.SHARED_RANGES["prefix_len"][2], profile_lib.SHARED_RANGES["text_len"][2]
    (decode,) = manifest["graphs"]["decode"]["profiles"]
    for segment in manifest["segments"]:
        s = segment["index"]
        expected = prefix_max + own_visual_width_max(manifest, plan, s) + text_max + profile_lib.MAX_NEW_TOKENS
        assert decode[f"past_len_{s}"][2] == expected, f"past_len_{s}"
