"""External weights: every graph is traced without its weights and points at one file per
parameter in `weights/`, written straight from the torch tensors and shared by all graphs of
the artifact. Checked against the transformers model's own state dict (the independent
expectation) on a demo export; ONNX Runtime parity on the same graphs is in test_export.py."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx

from export_helpers import artifact_root, artifacts  # noqa: F401
from sparsevlm.export.exporter import WEIGHTS_DIR
from sparsevlm.export.manifest import read_manifest


def _external_locations(path) -> dict[str, str]:
    """{initializer name: weights file} for one graph; fails on any weight stored inline."""
    model = onnx.load(str(path), load_external_data=False)
    locations = {}
    for tensor in model.graph.initializer:
        assert tensor.data_location == onnx.TensorProto.EXTERNAL, f"{path.name}: {tensor.name} is stored inline"
        entry = {e.key: e.value for e in tensor.external_data}
        assert entry.get("offset", "0") == "0"
        locations[tensor.name] = entry["location"]
    graph_inputs = {value.name for value in model.graph.input}
    assert not graph_inputs & set(locations), "a weight is still a graph input"
    return locations


def test_weights_are_shared_files_equal_to_the_model_parameters(artifacts, hf_model):
    root = artifacts("sparsevlm_v15_b192")
    manifest = read_manifest(root)
    state = hf_model.state_dict()
    users = defaultdict(set)  # weights file -> graphs that use it
    for name, graph in manifest["graphs"].items():
        locations = _external_locations(root / graph["file"])
        assert locations, f"{name}: no weights at all"
        for location in locations.values():
            users[location].add(name)
        graph_bytes = (root / graph["file"]).stat().st_size + sum((root / f).stat().st_size
                                                                 for f in set(locations.values()))
        assert graph["bytes"] == graph_bytes, name

    files = {p.relative_to(root).as_posix() for p in (root / WEIGHTS_DIR).iterdir()}
    assert files == set(users), "a weights file no graph uses, or a graph pointing at a missing file"
    assert files <= set(manifest["files"]), "weights files missing from the manifest's checksums"
    for location in files:
        parameter = state[location.removeprefix(WEIGHTS_DIR + "/")]
        stored = np.fromfile(root / location, dtype=parameter.numpy().dtype).reshape(parameter.shape)
        np.testing.assert_array_equal(stored, parameter.numpy(), err_msg=location)

    # Each layer's weights are stored once and used by its prefill segment and by decode.
    # (Only random matrices are checked: the tracer merges parameters with equal values, such
    # as the demo's all-ones norms, and each graph may keep a different one of them.)
    layer = {f for f in files if f.endswith(".self_attn.q_proj.weight") and ".language_model." in f}
    assert len(layer) == hf_model.config.text_config.num_hidden_layers
    for f in layer:
        assert len(users[f]) == 2 and "decode" in users[f], (f, users[f])
    assert users[f"{WEIGHTS_DIR}/lm_head.weight"] == {"decode", f"segment_{len(manifest['segments']) - 1}"}
    vision = {f for f, graphs in users.items() if graphs == {"vision"}}
    assert vision and all(".vision_tower." in f or ".multi_modal_projector." in f for f in vision)
    total = sum((root / f).stat().st_size for f in files)
    assert total < sum(g["bytes"] for g in manifest["graphs"].values())  # shared, not copied per graph
