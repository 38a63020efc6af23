"""Bad requests on a REAL tritonserver (python flavour), batched together with good ones.

Each bad request must get its own error: a client error as HTTP 400 / gRPC INVALID_ARGUMENT
with a one-line message naming the input and no server traceback; the good requests of the
same dynamic batch must get exactly the in-process answer; the server must stay healthy.
The server, repository and in-process reference are those of tests/test_triton_server.py
(its fixtures, one server for this module). Also: `sparsevlm-triton` refuses a corrupted
artifact with the cause, and `--validate` on a missing directory is one line.
"""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from export_helpers import artifact_root, artifacts, make_images, pipelines  # noqa: F401
from test_triton_server import (PROMPTS, _answer, _concurrent, artifact, images_png, png,  # noqa: F401
                                reference, repo, server, stream_error_then_answer)

from sparsevlm.runtime.triton.client import SparseVLMClient, TritonRequestError, build_inputs  # noqa: E402

NEW_TOKENS = 3


def header_only_png(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (what a decompression bomb shows a loader)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def sixteen_bit_png() -> bytes:
    rng = np.random.RandomState(3)
    grey = (np.kron(rng.rand(8, 8), np.ones((42, 42))) * 255).astype(np.uint16) * 257
    buffer = io.BytesIO()
    Image.fromarray(grey).save(buffer, format="PNG")
    return buffer.getvalue()


def raw_error(server, protocol, image: bytes, prompt, **params):
    """(status, message) of a request that fails, or (None, answer) when it succeeds.
    `prompt` may be bytes (sent as they are, e.g. not UTF-8)."""
    from tritonclient.utils import InferenceServerException

    if protocol == "http":
        import tritonclient.http as module
        client = module.InferenceServerClient(server.http_url)
    else:
        import tritonclient.grpc as module
        client = module.InferenceServerClient(server.grpc_url)
    inputs = build_inputs(module, image, "placeholder", **params)
    inputs[1].set_data_from_numpy(np.array([[prompt if isinstance(prompt, bytes) else prompt.encode()]],
                                           dtype=np.object_))
    try:
        client.infer("sparsevlm", inputs)
        return None, "answered"
    except InferenceServerException as error:
        return str(error.status()), error.message()
    finally:
        client.close()


@pytest.fixture(scope="module")
def bad_requests():
    """name -> (image bytes, prompt, params, words the error must contain)."""
    good = png(make_images(1)[0])
    return {
        "20000x20000 PNG": (header_only_png(20000, 20000), PROMPTS[0], {}, "more than 50,000,000 pixels"),
        "1x5000 PNG": (png(Image.new("RGB", (1, 5000), (200, 10, 10))), PROMPTS[0], {}, "aspect ratio of 5000:1"),
        "not an image": (b"\x89PNG broken", PROMPTS[0], {}, "not a decodable image"),
        "<image> in the prompt": (good, "Look at <image> please", {}, "contains the image placeholder"),
        "3000-token prompt": (good, "red blue " * 1500, {}, "tokens after the image"),
        "98k-character prompt": (good, "x" * 98000, {}, "98,000 characters"),
        "max_new_tokens 100000": (good, PROMPTS[0], {"max_new_tokens": 100000}, "max_new_tokens: expected 1..1024"),
    }


def assert_client_error(name, protocol, status, message, words):
    assert status in ("400", "StatusCode.INVALID_ARGUMENT"), (name, protocol, status, message)
    assert words in message, (name, message)
    assert "Traceback" not in message and 'File "' not in message and "\n" not in message, (name, message)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_each_bad_request_is_a_client_error(server, bad_requests, protocol):
    for name, (image, prompt, params, words) in bad_requests.items():
        status, message = raw_error(server, protocol, image, prompt, **{"max_new_tokens": NEW_TOKENS, **params})
        assert_client_error(name, protocol, status, message, words)
    status, message = raw_error(server, protocol, png(make_images(1)[0]), b"caf\xe9?", max_new_tokens=NEW_TOKENS)
    assert_client_error("non-UTF-8 prompt", protocol, status, message, "prompt: not valid UTF-8")


def test_bad_requests_fail_alone_in_their_batches(server, bad_requests, images_png, reference):
    """64 concurrent requests, HTTP and gRPC, every 4th one bad: the dynamic batcher mixes
    them; each good one must get exactly the in-process answer."""
    bad = list(bad_requests.items())
    jobs, expected = [], []
    for n in range(64):
        protocol = "http" if n % 2 else "grpc"
        if n % 4 == 0:
            name, (image, prompt, params, words) = bad[(n // 4) % len(bad)]
            jobs.append((protocol, image, prompt, {"max_new_tokens": NEW_TOKENS, **params}))
            expected.append(("bad", name, words))
        else:
            image, prompt = n % 5, (n // 5) % 5
            jobs.append((protocol, images_png[image], PROMPTS[prompt], {"max_new_tokens": NEW_TOKENS}))
            expected.append(("good", reference(image, prompt, images_png, max_new_tokens=NEW_TOKENS), None))
    count0, exec0 = server.inference_counts()["sparsevlm"]
    results = _concurrent(server, jobs, workers=16)
    outcome = {"clear error": 0, "correct": 0, "traceback": 0, "wrong": 0}
    for (kind, want, words), result in zip(expected, results):
        if kind == "good":
            outcome["correct" if result == want else "wrong"] += 1
        elif isinstance(result, TritonRequestError) and "Traceback" not in str(result) and words in str(result):
            outcome["clear error"] += 1
        elif isinstance(result, Exception):
            outcome["traceback"] += 1
        else:
            outcome["wrong"] += 1
    print(f"\n64 mixed requests (16 bad): {outcome}")
    assert outcome == {"clear error": 16, "correct": 48, "traceback": 0, "wrong": 0}
    count1, exec1 = server.inference_counts()["sparsevlm"]
    assert exec1 - exec0 < 64  # requests really were batched together
    assert server.alive()
    with SparseVLMClient(server.grpc_url, "grpc") as client:
        assert client.ready()
        assert _answer(client.generate(images_png[0], PROMPTS[0], max_new_tokens=NEW_TOKENS)) == \
            reference(0, 0, images_png, max_new_tokens=NEW_TOKENS)


def test_valid_unusual_images_are_answered_as_in_process(server, artifact, pipelines):  # noqa: F811
    """A 16-bit greyscale PNG is served exactly as the in-process runtime answers it."""
    pipe = pipelines(artifact, "onnxruntime")
    image = sixteen_bit_png()
    want = pipe.generate([image], [PROMPTS[0]], max_new_tokens=NEW_TOKENS)
    with SparseVLMClient(server.http_url, "http") as client:
        got = client.generate(image, PROMPTS[0], max_new_tokens=NEW_TOKENS)
    assert (got.text, got.token_ids, got.kept_per_layer) == (want.texts[0], want.token_ids[0], want.kept_per_layer[0])


def test_streaming_model_rejects_a_bomb_and_keeps_serving(server, images_png, reference, bad_requests):
    image, prompt, _, words = bad_requests["20000x20000 PNG"]
    message = stream_error_then_answer(server, images_png, reference, image, prompt)
    assert words in message and "Traceback" not in message


# --------------------------------------------------------------------------------------
# sparsevlm-triton: the artifact is checked when the repository is written
# --------------------------------------------------------------------------------------

def _triton_cli(*args) -> subprocess.CompletedProcess:
    command = Path(sys.executable).parent / "sparsevlm-triton"
    return subprocess.run([str(command), *map(str, args)], capture_output=True, text=True, timeout=600)


def test_sparsevlm_triton_refuses_a_corrupted_artifact(artifact, tmp_path):  # noqa: F811
    import shutil

    copy = tmp_path / "artifact"
    shutil.copytree(artifact, copy)
    decode = copy / "decode.onnx"
    data = bytearray(decode.read_bytes())
    data[100] ^= 0xFF
    decode.write_bytes(bytes(data))
    done = _triton_cli("--artifact", copy, "--out", tmp_path / "repo")
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert len(lines) == 1 and "decode.onnx does not match its checksum" in lines[0], done.stderr
    assert not (tmp_path / "repo").exists()
    missing = _triton_cli("--validate", tmp_path / "no-such-repo")
    lines = missing.stderr.strip().splitlines()
    assert missing.returncode == 2 and len(lines) == 1 and "no-such-repo does not exist" in lines[0], missing.stderr
