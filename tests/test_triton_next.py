"""A LLaVA-NeXT artifact served by a REAL tritonserver (nvidia-pytriton's, Python backend
only), in the TensorRT flavour's layout with every graph served from its ONNX file
(`--graph-backend onnxruntime`): the vision graph takes each request's tiles and anyres
layout, the orchestrator runs the generation loop. Three images of different sizes (three
visual counts) must give the in-process runtime's answers. Skipped with the reason when the
server environment is missing (see tests/test_triton_server.py)."""

from __future__ import annotations

import io

import pytest

from next_helpers import next_artifacts, next_dir, next_images  # noqa: F401

pytest.importorskip("tritonclient.grpc", reason="tritonclient[http,grpc] is not installed")
pytest.importorskip("tritonclient.http", reason="tritonclient[http] is not installed")

from sparsevlm.runtime.triton import RepoError  # noqa: E402
from sparsevlm.runtime.triton.repository import write_repository  # noqa: E402
from sparsevlm.runtime.triton.server import LocalTritonServer, find_server  # noqa: E402
from sparsevlm.runtime.triton.validation import validate_repository  # noqa: E402

try:
    find_server()
except RepoError as _error:
    pytest.skip(f"no usable nvidia-pytriton tritonserver: {_error}", allow_module_level=True)

from sparsevlm.runtime import Pipeline  # noqa: E402
from sparsevlm.runtime.triton.client import SparseVLMClient  # noqa: E402

ARTIFACT = "sparsevlm_v15_b192"
PROMPTS = ["What is in the image?", "How many objects are there?", "Is there a red circle?"]


def png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def served(next_artifacts, tmp_path_factory):  # noqa: F811
    artifact = next_artifacts(ARTIFACT)
    info = write_repository(artifact, tmp_path_factory.mktemp("triton_next") / "repo", flavour="tensorrt",
                            graph_backend="onnxruntime", max_batch=4)
    assert validate_repository(info.path) == []
    server = LocalTritonServer(info.path, ready_timeout=400)
    server.start()
    yield artifact, server
    server.stop()


def test_next_artifact_served_like_the_runtime(served, next_images):  # noqa: F811
    artifact, server = served
    pipe = Pipeline.load(artifact, backend="onnxruntime", threads=1)
    for n, (image, prompt) in enumerate(zip(next_images, PROMPTS)):
        protocol = "http" if n % 2 == 0 else "grpc"
        url = server.http_url if protocol == "http" else server.grpc_url
        with SparseVLMClient(url, protocol) as client:
            answer = client.generate(png(image), prompt, max_new_tokens=5)
        want = pipe.generate([image], [prompt], max_new_tokens=5)
        assert (answer.text, answer.token_ids, answer.kept_per_layer) == \
            (want.texts[0], want.token_ids[0], want.kept_per_layer[0]), f"image {n}"
    server.stop()
    assert server.proc.returncode == 0 and server.leftover_pids == [], server.log_tail()
