"""Qwen2.5-VL exported and run: method none through export + ONNX Runtime against
transformers' own greedy generation, torch == ONNX Runtime for SparseVLM v1.5 / v1.0 and
FastV at batch 1 and at batch 3 with three image sizes, and every graph call of those runs
inside the optimization profiles sparsevlm-build would build.

The checkpoint is the tiny Qwen2.5-VL of qwen_helpers with 8 decoder layers (export time),
so SparseVLM runs with explicit prune layers (v1.5: 2, 4, 6; v1.0: 2, 4, 5, 6); the
methods' rules on the default layers are checked in torch by tests/test_qwen_methods.py."""

from __future__ import annotations

import pytest
import torch

from export_helpers import assert_calls_fit_profiles, assert_same_decisions
from qwen_helpers import chat_prompt, make_image, make_images

pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")

from sparsevlm.export import export  # noqa: E402
from sparsevlm.methods.generation import SamplingParams  # noqa: E402
from sparsevlm.methods.spec import ModelSpec  # noqa: E402
from sparsevlm.runtime import Pipeline  # noqa: E402

NUM_LAYERS = 8
NEW_TOKENS = 8
PROMPTS = ["What is in the image?", "How many objects are there? Answer with one word.", "Is there a red circle?"]
METHODS = {
    "none": dict(method="none", budgets=None),
    "sparsevlm_v15_b192": dict(method="sparsevlm", variant="v1.5", budgets=[192], prune_layers=(2, 4, 6)),
    "sparsevlm_v10_b64": dict(method="sparsevlm", variant="v1.0", budgets=[64], prune_layers=(2, 4, 5, 6)),
    "fastv_R0.5": dict(method="fastv", budgets=None, K=2, R=0.5),
}
PRUNING = [name for name in METHODS if name != "none"]

pytestmark = pytest.mark.usefixtures("torch_single_thread")

_CACHE: dict = {}


@pytest.fixture(scope="session")
def qwen8_dir(tmp_path_factory):
    from sparsevlm.methods.qwen_demo import build_qwen_demo
    return build_qwen_demo(tmp_path_factory.mktemp("checkpoints") / "qwen-demo-8", num_layers=NUM_LAYERS)


@pytest.fixture(scope="session")
def qwen8_artifacts(qwen8_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen-artifacts")

    def get(name: str):
        if ("artifact", name) not in _CACHE:
            out = root / name
            export(str(qwen8_dir), out, progress=False, **METHODS[name])
            _CACHE[("artifact", name)] = out
        return _CACHE[("artifact", name)]
    return get


def pipeline(path, backend: str) -> Pipeline:
    if ("pipe", str(path), backend) not in _CACHE:
        _CACHE[("pipe", str(path), backend)] = Pipeline.load(path, backend=backend, threads=1)
    return _CACHE[("pipe", str(path), backend)]


def run(artifacts, name: str, backend: str, batch: int):
    if ("run", name, backend, batch) not in _CACHE:
        _CACHE[("run", name, backend, batch)] = pipeline(artifacts(name), backend).generate(
            make_images()[:batch], PROMPTS[:batch], max_new_tokens=NEW_TOKENS, temperature=0.0, stop_token_ids=())
    return _CACHE[("run", name, backend, batch)]


@torch.inference_mode()
def test_none_export_onnxruntime_matches_transformers(qwen8_artifacts, qwen8_dir):
    from transformers import Qwen2_5_VLForConditionalGeneration
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(qwen8_dir), dtype=torch.float32).eval()
    pipe = pipeline(qwen8_artifacts("none"), "onnxruntime")
    for image, question in ((make_image(230, 150, 0), PROMPTS[0]), (make_image(170, 80, 2), PROMPTS[1])):
        encoded = pipe.processor(images=[image], text=[chat_prompt(pipe.processor, question)])
        reference = model.generate(**encoded, max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True,
                                   return_dict_in_generate=True)
        out = pipe.generate_ids(encoded["input_ids"].tolist(), encoded["pixel_values"], SamplingParams(NEW_TOKENS),
                                image_sizes=encoded["image_grid_thw"])
        assert out.sequences[0].tolist() == reference.sequences[0, encoded["input_ids"].shape[1]:].tolist()
        diff = (torch.tensor(out.trace["logits_last"][0]) - reference.logits[0][0]).abs().max()
        assert diff <= 1e-4


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("name", PRUNING)
def test_torch_equals_onnxruntime(name, batch, qwen8_artifacts):
    ort, reference = run(qwen8_artifacts, name, "onnxruntime", batch), run(qwen8_artifacts, name, "torch", batch)
    assert_same_decisions(ort.trace, reference.trace, steps=NEW_TOKENS)
    assert all(count > 0 for layer in ort.trace["layers"] for count in layer["keep_count"])
    visual = [row["visual_per_layer_input"][0] for row in ort.accounting["rows"]]
    assert visual == [40, 16, 18][:batch]  # each row's own image


@pytest.mark.parametrize("name", list(METHODS))
def test_every_graph_call_fits_its_profile(name, qwen8_artifacts):
    pipe = pipeline(qwen8_artifacts(name), "onnxruntime")
    for batch in (1, 3):
        assert_calls_fit_profiles(pipe, make_images()[:batch], PROMPTS[:batch])


def test_profiles_span_the_processors_visual_counts(qwen8_artifacts, qwen8_dir):
    from transformers import AutoConfig
    spec = ModelSpec.from_hf_config(AutoConfig.from_pretrained(str(qwen8_dir)), str(qwen8_dir))
    manifest = pipeline(qwen8_artifacts("fastv_R0.5"), "onnxruntime").artifact.manifest
    assert ModelSpec.from_json(manifest["model"]) == spec and (spec.min_visual, spec.num_visual) == (4, 256)
    (vision,) = manifest["graphs"]["vision"]["profiles"]
    assert vision["visual_len"] == [4, 256, 256]
    assert vision["patches"] == [16, 1024, 8 * 1024]  # 4 patches per visual token, up to 8 images
    (segment0,) = manifest["graphs"]["segment_0"]["profiles"]
    assert segment0["visual_len"] == vision["visual_len"]


def test_calibration_learns_widths_of_every_image(qwen8_dir, qwen8_artifacts, tmp_path):
    """sparsevlm-calibrate on images of three sizes: each sample's first layer sees its own
    image's visual count and keeps the scaled v1.5 count, and the buckets it writes pass the
    exporter's check and hold every width the samples needed."""
    import json

    from sparsevlm.calibration import calibrate
    from sparsevlm.export.exporter import calibration_buckets
    from sparsevlm.methods import SparseVLMConfig
    from sparsevlm.methods.loading import load_model
    from sparsevlm.runtime.artifact import Artifact

    for i, image in enumerate(make_images()):
        image.save(tmp_path / f"image_{i}.png")
    lines = [json.dumps({"image": f"image_{i}.png", "prompt": prompt}) for i in range(3) for prompt in PROMPTS[:2]]
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")
    kwargs = dict(METHODS["sparsevlm_v15_b192"])
    config = SparseVLMConfig(budget=kwargs.pop("budgets")[0], **kwargs)
    result = calibrate(str(qwen8_dir), config, str(tmp_path / "data.jsonl"), tmp_path / "calibration",
                       max_profiles=3, coverage=1.0, batch_size=6, progress=False, report=False)
    widths = set()
    for record in result.records:
        count = [40, 16, 18][record["index"] // 2]
        assert record["layers"][0]["visual_in"] == count
        assert record["layers"][0]["keep_count"] == round(300 * count / 576)
        widths.add(record["segments"][1]["visual_width"])
    assert len(widths) == 3
    buckets = calibration_buckets(result.calibration_path, Artifact.load(qwen8_artifacts("sparsevlm_v15_b192")).plan,
                                  load_model(str(qwen8_dir))[0])
    assert all(any(lo <= w <= hi for lo, _, hi in buckets[0]) for w in widths)


@pytest.mark.parametrize("flavour", ["python", "tensorrt"])
def test_triton_repository_of_a_qwen_artifact_validates(flavour, qwen8_artifacts, tmp_path):
    """sparsevlm-triton writes a valid repository for a Qwen2.5-VL artifact; the tensorrt
    flavour's vision model takes the flattened patches and their layout. (A real server run
    needs nvidia-pytriton: tests/test_triton_server.py.)"""
    from sparsevlm.runtime.triton.repository import write_repository
    from sparsevlm.runtime.triton.validation import validate_repository
    artifact = qwen8_artifacts("sparsevlm_v15_b192")
    kwargs = dict(graph_backend="onnxruntime") if flavour == "tensorrt" else {}
    info = write_repository(artifact, tmp_path / "repo", flavour=flavour, max_batch=4, **kwargs)
    assert validate_repository(info.path) == []
    if flavour == "tensorrt":
        config = (info.path / "sparsevlm_vision" / "config.pbtxt").read_text()
        assert all(f'"{name}"' in config for name in ("patches", "window_order", "image_index", "image_valid"))


def test_fastervlm_refused_by_the_export_command(qwen8_dir, tmp_path, capsys):
    """FasterVLM on Qwen2.5-VL: one line naming why (no [CLS] token), exit 2, nothing written."""
    from test_cli_bad_inputs import assert_user_error, in_process
    result = in_process("sparsevlm-export", "--model", qwen8_dir, "--method", "fastervlm", "--budget", "64",
                        "--out", tmp_path / "out", capsys=capsys)
    last = assert_user_error(result, "sparsevlm-export", "fastervlm", "[CLS]")
    assert "Qwen2.5-VL" in last and not (tmp_path / "out").exists()


def test_qwen_artifact_served_by_a_real_tritonserver(qwen8_artifacts, tmp_path):
    """A REAL tritonserver (nvidia-pytriton's, Python backend) serves a Qwen2.5-VL artifact in
    the TensorRT flavour's layout with every graph on ONNX Runtime: three images of different
    sizes (three visual counts) give the in-process runtime's answers, over HTTP and gRPC."""
    import io

    pytest.importorskip("tritonclient.grpc", reason="tritonclient[http,grpc] is not installed")
    pytest.importorskip("tritonclient.http", reason="tritonclient[http] is not installed")
    from sparsevlm.runtime.triton import RepoError
    from sparsevlm.runtime.triton.client import SparseVLMClient
    from sparsevlm.runtime.triton.repository import write_repository
    from sparsevlm.runtime.triton.server import LocalTritonServer, find_server
    from sparsevlm.runtime.triton.validation import validate_repository
    try:
        find_server()
    except RepoError as error:
        pytest.skip(f"no usable nvidia-pytriton tritonserver: {error}")

    artifact = qwen8_artifacts("sparsevlm_v15_b192")
    info = write_repository(artifact, tmp_path / "repo", flavour="tensorrt", graph_backend="onnxruntime", max_batch=4)
    assert validate_repository(info.path) == []
    pipe = pipeline(artifact, "onnxruntime")
    server = LocalTritonServer(info.path, ready_timeout=400)
    server.start()
    try:
        for n, (image, prompt) in enumerate(zip(make_images(), PROMPTS)):
            png = io.BytesIO()
            image.save(png, format="PNG")
            url = server.http_url if n % 2 == 0 else server.grpc_url
            with SparseVLMClient(url, "http" if n % 2 == 0 else "grpc") as client:
                answer = client.generate(png.getvalue(), prompt, max_new_tokens=5)
            want = pipe.generate([image], [prompt], max_new_tokens=5)
            assert (answer.text, answer.token_ids, answer.kept_per_layer) == \
                (want.texts[0], want.token_ids[0], want.kept_per_layer[0]), f"image {n}"
    finally:
        server.stop()
    assert server.proc.returncode == 0 and server.leftover_pids == [], server.log_tail()
