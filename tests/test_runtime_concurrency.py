"""One `Pipeline`, several threads at once: every call returns what it returns alone.

The artifact is the SparseVLM v1.0 (rank rule) demo export, whose visual widths depend on the
prompt and image. Its manifest gets, per pruning segment, one narrow profile per width the
requests reach (so the requests' profile choices differ) behind a first, wide profile that
contains them all: the runtime's rule runs the cheapest containing profile (the narrow one),
not the first. Four threads then run four different requests on one Pipeline, twice each,
at the same time; tokens, kept counts, trace decisions and profile choices must equal the
sequential runs'. The graph calls are recorded per thread, and the TensorRT executor's pure
choice (`profile_for_shapes` over the engine profiles `sparsevlm-build` would build from
this manifest) must pick, from the recorded shapes alone, the profile the run reports.
"""

from __future__ import annotations

import copy
import dataclasses
import threading
from collections import defaultdict

import pytest

from export_helpers import (PROMPTS, RecordingExecutor, artifact_root, artifacts, engine_profiles,  # noqa: F401
                            make_images, pipelines)

pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")

from sparsevlm.methods.profiles import profile_for_shapes  # noqa: E402
from sparsevlm.runtime import Pipeline  # noqa: E402

NAME = "sparsevlm_v10_b192"
REQUESTS = list(zip(range(4), PROMPTS + ["Describe the colours and the shapes you can see."]))
NEW_TOKENS = 6
ROUNDS = 2


def narrow_profiles(manifest: dict, widths: dict[int, list[int]], num_visual: int) -> dict:
    """`manifest` with each pruning segment's `visual_width` profiles replaced by a wide one
    [1, num_visual] first, then contiguous narrow buckets [previous max + 1, w, w], one per
    distinct width w the requests reach."""
    out = copy.deepcopy(manifest)
    for segment in out["segments"]:
        if not segment["profile_dim"]:
            continue
        graph = out["graphs"][segment["graph"]]
        base = graph["profiles"][0]
        buckets, low = [[1, num_visual // 2, num_visual]], 1
        for width in sorted(set(widths[segment["index"]])):
            buckets.append([low, width, width])
            low = width + 1
        graph["profiles"] = [{**base, segment["profile_dim"]: bucket} for bucket in buckets]
    return out


def run(pipe: Pipeline, request, images):
    image, prompt = request
    return pipe.generate([images[image]], [prompt], max_new_tokens=NEW_TOKENS, temperature=0.0, stop_token_ids=())


def summary(out) -> dict:
    return {"tokens": out.token_ids, "kept": out.kept_per_layer, "profiles": out.profiles,
            "layers": out.trace["layers"], "greedy": out.trace["greedy_tokens"]}


def test_one_pipeline_from_several_threads_matches_sequential_runs(artifacts, pipelines):  # noqa: F811
    images = make_images(len(REQUESTS))
    base = pipelines(artifacts(NAME), "onnxruntime")
    widths = defaultdict(list)
    for request in REQUESTS:
        for choice in run(base, request, images).profiles:
            widths[choice["segment"]].append(choice["width"])
    manifest = narrow_profiles(base.artifact.manifest, widths, base.artifact.plan.num_visual)
    recorder = RecordingExecutor(base.executor, manifest)
    pipe = Pipeline(dataclasses.replace(base.artifact, manifest=manifest), recorder, "onnxruntime")

    sequential = [summary(run(pipe, request, images)) for request in REQUESTS]
    for expected in sequential:  # hand-computed: width w runs in the narrow bucket [.., w, w], not the wide first one
        for choice in expected["profiles"]:
            assert choice["padded_width"] == choice["width"]
            assert choice["profile"] == 1 + sorted(set(widths[choice["segment"]])).index(choice["width"])
    assert len({tuple(c["profile"] for c in s["profiles"]) for s in sequential}) > 1, "the requests' choices should differ"
    assert all(len(s["profiles"]) == len(base.artifact.plan.prune_layers) for s in sequential)

    recorder.calls.clear()
    start = threading.Barrier(len(REQUESTS))
    results, errors, threads_of = {}, [], {}

    def worker(number: int):
        try:
            threads_of[number] = threading.get_ident()
            start.wait()
            results[number] = [summary(run(pipe, REQUESTS[number], images)) for _ in range(ROUNDS)]
        except BaseException as error:  # reported in the main thread
            errors.append(error)
            start.abort()

    threads = [threading.Thread(target=worker, args=(number,)) for number in range(len(REQUESTS))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for number, expected in enumerate(sequential):
        assert results[number] == [expected] * ROUNDS, f"request {number}: a concurrent run differs from its sequential run"

    # The TensorRT executor's choice, from each thread's recorded shapes alone.
    profiles = engine_profiles(manifest)
    pruning_graphs = {s["graph"] for s in manifest["segments"] if s["profile_dim"]}
    for number, expected in enumerate(sequential):
        calls = recorder.calls[threads_of[number]]
        assert len(calls) == ROUNDS * (1 + len(manifest["segments"]) + NEW_TOKENS - 1)  # vision, segments, decode
        found = [profile_for_shapes(profiles[graph], shapes) for graph, shapes in calls if graph in pruning_graphs]
        assert found == [c["profile"] for c in expected["profiles"]] * ROUNDS
