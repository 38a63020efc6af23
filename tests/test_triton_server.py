"""Triton repositories served by a REAL tritonserver (the one bundled in the
nvidia-pytriton wheel, Python backend only) on 127.0.0.1, compared with the in-process runtime.

Needs `tritonclient[http,grpc]` in this environment and an environment with
`nvidia-pytriton==0.7.0` and `numpy<2` for the server ($SPARSEVLM_TRITON_ENV, default
build/triton-env; see runtime/triton/README.md). Skipped with the reason when either is missing.
"""

from __future__ import annotations

import io
import json
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from export_helpers import artifact_root, artifacts, make_images, pipelines  # noqa: F401

pytest.importorskip("tritonclient.grpc", reason="tritonclient[http,grpc] is not installed "
                    "(pip install 'tritonclient[http,grpc]')")
pytest.importorskip("tritonclient.http", reason="tritonclient[http] is not installed")

from sparsevlm.runtime.triton import RepoError  # noqa: E402
from sparsevlm.runtime.triton.repository import write_repository  # noqa: E402
from sparsevlm.runtime.triton.server import LocalTritonServer, find_server  # noqa: E402
from sparsevlm.runtime.triton.validation import validate_repository  # noqa: E402

try:
    find_server()
except RepoError as _error:
    pytest.skip(f"no usable nvidia-pytriton tritonserver: {_error}", allow_module_level=True)

from sparsevlm.runtime.triton.client import (ClientPool, SparseVLMClient, TritonRequestError,  # noqa: E402
                                             build_inputs)

ARTIFACT = "sparsevlm_v15_b192"  # SparseVLM v1.5, budget 192 (the default method) on the demo model
PROMPTS = ["What is in the image?", "How many objects are there?", "What color is the large square?",
           "Is there a red circle? Answer yes or no.",
           "Look at this picture carefully and describe the shapes, colors and their positions."]
NEW_TOKENS = 6


def png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def images_png():
    return [png(image) for image in make_images(5)]


@pytest.fixture(scope="module")
def artifact(artifacts):  # noqa: F811
    return artifacts(ARTIFACT)


@pytest.fixture(scope="module")
def reference(artifact, pipelines):  # noqa: F811
    """reference(image_index, prompt_index, **params) -> the in-process RunOutput (cached)."""
    pipe = pipelines(artifact, "onnxruntime")
    cache = {}

    def get(image, prompt, images, **params):
        key = (image, prompt, tuple(sorted(params.items())))
        if key not in cache:
            out = pipe.generate([images[image]], [PROMPTS[prompt]], **params)
            cache[key] = (out.texts[0], out.token_ids[0], out.kept_per_layer[0])
        return cache[key]
    return get


@pytest.fixture(scope="module")
def repo(artifact, tmp_path_factory):
    info = write_repository(artifact, tmp_path_factory.mktemp("triton") / "repo", instances=1, max_batch=8,
                            queue_delay_us=5000)
    return info


@pytest.fixture(scope="module")
def server(repo):
    server = LocalTritonServer(repo.path, ready_timeout=300)
    server.start()
    yield server
    server.stop()


def _answer(a):
    return (a.text, a.token_ids, a.kept_per_layer)


def test_repository_is_self_describing_and_server_ready(repo, server):
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    assert validate_repository(repo.path) == []
    assert sorted(repo.models) == ["sparsevlm", "sparsevlm_stream"]
    for model in repo.models:
        assert (repo.path / model / "config.pbtxt").exists() and (repo.path / model / "1" / "model.py").exists()
    described = json.loads((repo.path / "sparsevlm_repo.json").read_text())
    assert described["flavour"] == "python" and Path(described["artifact"]) == Path(repo.artifact)
    assert "start_server.sh" in (repo.path / "README.md").read_text()

    with urllib.request.urlopen(f"http://{server.http_url}/v2/health/ready", timeout=10) as response:
        assert response.status == 200
    http = httpclient.InferenceServerClient(server.http_url)
    grpc = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        assert http.is_server_ready() and grpc.is_server_ready()
        for model in repo.models:
            assert http.is_model_ready(model) and grpc.is_model_ready(model)
        index = {m["name"]: m["state"] for m in http.get_model_repository_index()}
        assert index == {"sparsevlm": "READY", "sparsevlm_stream": "READY"}
        meta = http.get_model_metadata("sparsevlm")
        assert [i["name"] for i in meta["inputs"]] == ["image", "prompt", "max_new_tokens", "temperature", "top_p",
                                                       "seed"]
        assert [o["name"] for o in meta["outputs"]] == ["text", "token_ids", "kept_per_layer"]
        config = grpc.get_model_config("sparsevlm_stream", as_json=True)["config"]
        assert config["model_transaction_policy"]["decoupled"] is True
    finally:
        http.close()
        grpc.close()
    print(f"\nserver ready in {server.startup_seconds:.1f} s")


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_answers_token_identical_to_in_process(server, reference, images_png, protocol):
    url = server.http_url if protocol == "http" else server.grpc_url
    cases = [(0, 0, {}), (1, 1, {"max_new_tokens": NEW_TOKENS}), (2, 4, {"max_new_tokens": 3}),
             (3, 2, {"max_new_tokens": NEW_TOKENS, "temperature": 0.9, "top_p": 0.8, "seed": 1234}),
             (4, 3, {"max_new_tokens": NEW_TOKENS, "temperature": 1.3, "seed": 7})]
    with SparseVLMClient(url, protocol) as client:
        for image, prompt, params in cases:
            got = _answer(client.generate(images_png[image], PROMPTS[prompt], **params))
            want = reference(image, prompt, images_png, **params)
            assert got == want, (protocol, image, prompt, params)
    # Same seed twice: the same sample; another seed: a different one (sampling is really seeded).
    params = {"max_new_tokens": NEW_TOKENS, "temperature": 1.5, "seed": 99}
    with SparseVLMClient(url, protocol) as client:
        first = client.generate(images_png[0], PROMPTS[0], **params)
        again = client.generate(images_png[0], PROMPTS[0], **params)
        other = client.generate(images_png[0], PROMPTS[0], **dict(params, seed=100))
    assert first.token_ids == again.token_ids == reference(0, 0, images_png, **params)[1]
    assert other.token_ids == reference(0, 0, images_png, **dict(params, seed=100))[1]


def test_streaming_sends_the_same_tokens_in_order(server, reference, images_png):
    for image, prompt, params in [(0, 0, {"max_new_tokens": 12}), (3, 1, {"max_new_tokens": 8, "temperature": 0.7,
                                                                           "seed": 5})]:
        text, tokens, kept = reference(image, prompt, images_png, **params)
        with SparseVLMClient(server.grpc_url, "grpc") as client:
            pieces = list(client.stream(images_png[image], PROMPTS[prompt], **params))
        token_pieces = [p for p in pieces if not p.final]
        assert [p.final for p in pieces] == [False] * len(token_pieces) + [True]
        assert all(len(p.token_ids) == 1 for p in token_pieces)  # one response per generated token
        assert [p.token_ids[0] for p in token_pieces] == tokens
        assert "".join(p.text for p in pieces) == text
        assert pieces[-1].kept_per_layer == kept and pieces[-1].token_ids == []
        # (When tokens arrive is a timing question: benchmarks/, not a test.)


def _concurrent(server, jobs, workers=16):
    """Run jobs [(protocol, image_bytes, prompt, params)] from a bounded pool of threads.
    Returns [(answer tuple | exception)] in job order."""
    def run(job):
        protocol, image, prompt, params = job
        try:
            return _answer(clients.get(protocol).generate(image, prompt, **params))
        except Exception as error:  # noqa: BLE001 - counted as a failure by the caller
            return error

    with ClientPool(server.http_url, server.grpc_url) as clients, ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(run, jobs, timeout=900))


def test_200_concurrent_mixed_requests(server, reference, images_png):
    combos = [(i, p) for i in range(5) for p in range(5)]  # 25 different (image, prompt) pairs
    params = {"max_new_tokens": 4}
    expected = {c: reference(c[0], c[1], images_png, **params) for c in combos}
    jobs, keys = [], []
    for n in range(200):
        image, prompt = combos[(n * 7) % len(combos)]
        jobs.append(("http" if n % 2 else "grpc", images_png[image], PROMPTS[prompt], params))
        keys.append((image, prompt))
    count0, exec0 = server.inference_counts()["sparsevlm"]
    t0 = time.monotonic()
    results = _concurrent(server, jobs)
    elapsed = time.monotonic() - t0
    failures = [r for r in results if isinstance(r, Exception)]
    assert not failures, f"{len(failures)} failures, first: {failures[0]!r}"
    mismatches = [(k, r) for k, r in zip(keys, results) if r != expected[k]]
    assert not mismatches, f"{len(mismatches)} answers differ from the in-process runtime, first: {mismatches[0]}"
    count1, exec1 = server.inference_counts()["sparsevlm"]
    assert count1 - count0 == 200
    assert exec1 - exec0 < 200  # the dynamic batcher really batched requests together
    print(f"\n200 concurrent requests (HTTP+gRPC, 16 threads): {elapsed:.1f} s, {200 / elapsed:.1f} req/s, "
          f"{exec1 - exec0} executions")


def _raw_infer(server, protocol, inputs_fn):
    """Send hand-built tensors; returns the error message (or None when it succeeded)."""
    from tritonclient.utils import InferenceServerException

    if protocol == "http":
        import tritonclient.http as module
        client = module.InferenceServerClient(server.http_url)
    else:
        import tritonclient.grpc as module
        client = module.InferenceServerClient(server.grpc_url)
    try:
        client.infer("sparsevlm", inputs_fn(module))
        return None
    except InferenceServerException as error:
        return error.message()
    finally:
        client.close()


def _tensor(module, name, array, dtype):
    t = module.InferInput(name, list(array.shape), dtype)
    t.set_data_from_numpy(array)
    return t


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_bad_requests_get_clear_errors_and_server_stays_healthy(server, reference, images_png, protocol):
    good = images_png[0]
    image = lambda m: _tensor(m, "image", np.array([[good]], dtype=np.object_), "BYTES")  # noqa: E731
    prompt = lambda m: _tensor(m, "prompt", np.array([[b"What is in the image?"]], dtype=np.object_), "BYTES")  # noqa: E731
    cases = {
        "no prompt": (lambda m: [image(m)], "prompt"),
        "not an image": (lambda m: [_tensor(m, "image", np.array([[b"this is not an image"]], dtype=np.object_),
                                            "BYTES"), prompt(m)], "not a decodable image"),
        "truncated png": (lambda m: [_tensor(m, "image", np.array([[good[:60]]], dtype=np.object_), "BYTES"),
                                     prompt(m)], "not a decodable image"),
        "wrong dtype": (lambda m: [image(m), _tensor(m, "prompt", np.array([[1]], dtype=np.int32), "INT32")],
                        "data-type"),
        "wrong shape": (lambda m: [_tensor(m, "image", np.array([[good, good]], dtype=np.object_), "BYTES"),
                                   prompt(m)], "unexpected shape"),
        "bad max_new_tokens": (lambda m: [image(m), prompt(m), _tensor(m, "max_new_tokens", np.array([[0]], np.int32),
                                                                       "INT32")], "max_new_tokens"),
        "bad top_p": (lambda m: [image(m), prompt(m), _tensor(m, "top_p", np.array([[1.5]], np.float32), "FP32")],
                      "top_p"),
        "batch too large": (lambda m: [_tensor(m, "image", np.array([[good]] * 9, dtype=np.object_), "BYTES"),
                                       _tensor(m, "prompt", np.array([[b"x"]] * 9, dtype=np.object_), "BYTES")],
                            "batch-size must be <= 8"),
    }
    for name, (inputs_fn, expected) in cases.items():
        message = _raw_infer(server, protocol, inputs_fn)
        assert message is not None, f"{name}: the server accepted a bad request"
        assert expected in message, f"{name}: unclear error {message!r}"
    # A bad request batched together with good ones fails alone.
    jobs = [(protocol, good if n % 4 else b"\x89PNG broken", PROMPTS[0], {"max_new_tokens": 3}) for n in range(12)]
    results = _concurrent(server, jobs, workers=12)
    for n, result in enumerate(results):
        if n % 4:
            assert result == reference(0, 0, images_png, max_new_tokens=3)
        else:
            assert isinstance(result, TritonRequestError) and "not a decodable image" in str(result)
    assert server.alive()
    with SparseVLMClient(server.http_url if protocol == "http" else server.grpc_url, protocol) as client:
        assert client.ready()
        assert _answer(client.generate(good, PROMPTS[0], max_new_tokens=3)) == reference(0, 0, images_png,
                                                                                         max_new_tokens=3)


def stream_error_then_answer(server, images_png, reference, image: bytes, prompt: str) -> str:
    """One bad request to the streaming model: its error message (it must get no result).
    Then a good stream must still get the in-process tokens."""
    import queue

    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(server.grpc_url)
    responses = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    try:
        client.async_stream_infer("sparsevlm_stream", build_inputs(grpcclient, image, prompt))
        result, error = responses.get(timeout=120)
        assert result is None and error is not None
    finally:
        client.stop_stream()
        client.close()
    with SparseVLMClient(server.grpc_url, "grpc") as c:
        pieces = list(c.stream(images_png[1], PROMPTS[1], max_new_tokens=4))
    assert [p.token_ids[0] for p in pieces[:-1]] == reference(1, 1, images_png, max_new_tokens=4)[1]
    return error.message()


def test_streaming_rejects_bad_input_and_keeps_serving(server, images_png, reference):
    assert "not a decodable image" in stream_error_then_answer(server, images_png, reference, b"nope", PROMPTS[0])


def test_server_stops_cleanly(server):
    """Last in this module: SIGTERM, no process of the server's group left, no /dev/shm region left."""
    pid = server.proc.pid
    t0 = time.monotonic()
    server.stop()
    print(f"\nserver stopped in {time.monotonic() - t0:.1f} s")
    assert server.proc.returncode == 0, server.log_tail()
    assert server.leftover_pids == [], f"processes left after stop: {server.leftover_pids}"
    assert server.leftover_shm == [], f"/dev/shm regions left after stop: {server.leftover_shm}"
    assert not Path(f"/proc/{pid}").exists()
    assert not list(Path("/dev/shm").glob(f"{server.shm_prefix}*"))


# --------------------------------------------------------------------------------------
# The TensorRT flavour's orchestration on a real server. The BLS orchestrator `sparsevlm` runs the
# runtime's generation loop and profile planner and sends every graph to its own model. Here
# `--graph-backend onnxruntime` serves each graph from its ONNX file (the nvidia-pytriton server
# has no TensorRT backend); names, tensors and orchestrator are those of the tensorrt_plan
# repository. Answers must equal the in-process runtime's, and every graph model must really
# have been called (vision and each segment once per request, decode once per further step).
# Runs after the python-flavour server above has been stopped (2 cores).
# --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bls_setup(artifact, pipelines, tmp_path_factory):  # noqa: F811
    info = write_repository(artifact, tmp_path_factory.mktemp("triton_bls") / "repo", flavour="tensorrt",
                            graph_backend="onnxruntime", max_batch=4)
    assert validate_repository(info.path) == []
    server = LocalTritonServer(info.path, ready_timeout=400)
    server.start()
    yield info, server, pipelines(artifact, "onnxruntime")
    server.stop()


def test_bls_orchestrator_matches_the_runtime(bls_setup, reference, images_png):
    info, server, pipe = bls_setup
    segments = [m for m in info.models if "_segment_" in m]
    assert len(segments) == len(pipe.artifact.manifest["segments"])
    before = server.inference_counts()
    steps = 0
    cases = [("http", 0, {"max_new_tokens": 5}), ("grpc", 1, {"max_new_tokens": 4}),
             ("http", 2, {"max_new_tokens": 4, "temperature": 0.8, "seed": 3})]
    for protocol, n, params in cases:
        url = server.http_url if protocol == "http" else server.grpc_url
        with SparseVLMClient(url, protocol) as client:
            answer = client.generate(images_png[n], PROMPTS[n], **params)
        want = reference(n, n, images_png, **params)
        assert _answer(answer) == want
        steps += len(want[1]) - 1
    after = server.inference_counts()
    calls = {name: after[name][1] - before.get(name, (0, 0))[1] for name in after}
    assert calls["sparsevlm"] == 3 and calls["sparsevlm_vision"] == 3
    assert all(calls[m] == 3 for m in segments)
    assert calls["sparsevlm_decode"] == steps


def test_bls_server_stops_cleanly(bls_setup):
    _, server, _ = bls_setup
    t0 = time.monotonic()
    server.stop()
    print(f"\nBLS server: ready in {server.startup_seconds:.1f} s, stopped in {time.monotonic() - t0:.1f} s")
    assert server.leftover_pids == [] and server.leftover_shm == []
