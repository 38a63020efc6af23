"""Inputs as users really have them (docs/inputs.md), through the Python API, the runtime
Pipeline and `sparsevlm-run`: every bad input gets one InputError naming the input (and
the row), never a foreign exception, a silently wrong answer or an unbounded run; and the
unusual-but-valid images (16-bit, float, alpha, palette, EXIF-rotated, numpy) decode to
the 8-bit RGB that docs/inputs.md promises, checked against hand-computed pixels and, end
to end, against the answer for the same pixels given as a plain 8-bit RGB image.
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
import torch
from PIL import Image

from export_helpers import artifact_root, artifacts, make_images, pipelines  # noqa: F401
from sparsevlm.methods import InputError, SparseLlava, SparseVLMConfig
from sparsevlm.methods.config import ConfigError
from sparsevlm.methods.inputs import (MAX_ASPECT_RATIO, MAX_CHARS_PER_TOKEN, MAX_IMAGE_PIXELS, InputBounds,
                                      load_image, prepare_inputs)
from sparsevlm.runtime.cli import main as run_main

ARTIFACT = "sparsevlm_v15_b192"
QUESTION = "What is in the image?"


def encode(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with one tiny (wrong) data chunk: what a
    decompression bomb or a lying header looks like to a loader that decodes first."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def grey8() -> np.ndarray:
    rng = np.random.RandomState(7)
    return (np.kron(rng.rand(8, 8), np.ones((42, 42))) * 255).astype(np.uint8)


def rgb_of(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey[:, :, None], 3, axis=2)


# --------------------------------------------------------------------------------------
# Images: decoding rules (no model)
# --------------------------------------------------------------------------------------

def test_16_bit_grey_png_scales_to_8_bit():
    grey = grey8()
    decoded = load_image(encode(Image.fromarray(grey.astype(np.uint16) * 257)))  # mode I;16 in the file
    assert decoded.mode == "RGB" and np.array_equal(np.asarray(decoded), rgb_of(grey))
    # full range: 65535 -> 255, 0 -> 0, 32896 (= 128 * 257) -> 128
    wide = np.array([[0, 65535, 128 * 257, 300]], dtype=np.uint16)
    assert np.asarray(load_image(encode(Image.fromarray(wide))))[0, :, 0].tolist() == [0, 255, 128, 1]
    # 32-bit integer grey (mode I) holding 16-bit values follows the same rule
    as_int32 = Image.fromarray(grey.astype(np.int32) * 257)
    assert as_int32.mode == "I" and np.array_equal(np.asarray(load_image(as_int32)), rgb_of(grey))


def test_float_tiff_scales_by_the_documented_rule():
    grey = grey8()
    unit = Image.fromarray(grey.astype(np.float32) / 255.0)
    assert unit.mode == "F"
    assert np.array_equal(np.asarray(load_image(encode(unit, "TIFF"))), rgb_of(grey))  # [0, 1] x 255
    values = np.array([[-2.0, 0.0, 6.0]], dtype=np.float32)  # outside [0, 1]: min-max to [0, 255]
    assert np.asarray(load_image(Image.fromarray(values)))[0, :, 0].tolist() == [0, 64, 255]
    with pytest.raises(InputError, match="image: floating-point pixels include NaN"):
        load_image(Image.fromarray(np.array([[0.5, np.nan]], dtype=np.float32)))


def test_transparency_is_composited_on_white():
    rgb = np.asarray(make_images(1)[0])
    alpha = np.zeros(rgb.shape[:2], np.uint8)
    alpha[:, 168:] = 255
    decoded = np.asarray(load_image(encode(Image.fromarray(np.dstack([rgb, alpha])))))
    assert (decoded[:, :168] == 255).all() and np.array_equal(decoded[:, 168:], rgb[:, 168:])
    # a palette with a transparent colour, and grey + alpha
    palette = Image.new("P", (4, 1))
    palette.putpalette([10, 20, 30, 200, 100, 0] + [0] * 762)
    palette.putdata([0, 1, 0, 1])
    palette.info["transparency"] = 0
    assert np.asarray(load_image(encode(palette)))[0].tolist() == [[255] * 3, [200, 100, 0]] * 2
    la = Image.fromarray(np.array([[[40, 0], [40, 255]]], dtype=np.uint8), "LA")
    assert np.asarray(load_image(encode(la)))[0].tolist() == [[255] * 3, [40] * 3]


def test_exif_orientation_of_a_file_is_applied():
    pixels = np.asarray(make_images(1)[0])[:, :200]  # 200 wide, 336 high
    stored = Image.fromarray(pixels)
    exif = stored.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    data = encode(stored, "PNG", exif=exif.tobytes())
    decoded = load_image(data)
    assert decoded.size == (336, 200)
    assert np.array_equal(np.asarray(decoded), np.rot90(pixels, k=-1))  # clockwise quarter turn
    # A PIL image passed in is taken as the caller's pixels (they may have rotated it already).
    assert load_image(Image.open(io.BytesIO(data))).size == (200, 336)


def test_numpy_images_are_images():
    rgb = np.asarray(make_images(1)[0])
    assert np.array_equal(np.asarray(load_image(rgb)), rgb)
    assert np.array_equal(np.asarray(load_image(rgb[:, :, 0])), rgb_of(rgb[:, :, 0]))
    with pytest.raises(InputError, match=r"image: a numpy image must be uint8 .* got float64 \(336, 336, 3\)"):
        load_image(rgb / 255.0)
    with pytest.raises(InputError, match="image 3: expected a PIL image, an image file path, .* got NoneType"):
        load_image(None, "image 3")


def test_oversized_and_extreme_images_are_refused_before_decoding():
    bomb = png_header_only(20000, 20000)  # 400 MP claimed: PIL's own check raises its foreign error
    with pytest.raises(InputError, match="more than 50,000,000 pixels"):
        load_image(bomb)
    big = png_header_only(8000, 7000)  # 56 MP: above our limit, below PIL's
    with pytest.raises(InputError, match="8000x7000 pixels is 56.0 megapixels; at most 50"):
        load_image(big)
    thin = encode(Image.new("RGB", (1, 5000), (200, 10, 10)))
    with pytest.raises(InputError, match=f"1x5000 pixels has an aspect ratio of 5000:1; at most {MAX_ASPECT_RATIO}:1"):
        load_image(thin)
    assert load_image(encode(Image.new("RGB", (MAX_ASPECT_RATIO, 1)))).size == (MAX_ASPECT_RATIO, 1)  # the edge
    with pytest.raises(InputError, match="aspect ratio"):
        load_image(np.zeros((1, MAX_ASPECT_RATIO + 1, 3), np.uint8))
    assert MAX_IMAGE_PIXELS == 50_000_000
    good = encode(make_images(1)[0])
    with pytest.raises(InputError, match="not a decodable image"):
        load_image(good[: len(good) // 2])  # truncated
    with pytest.raises(InputError, match="empty bytes"):
        load_image(b"")


# --------------------------------------------------------------------------------------
# Prompts and lengths (a stub processor: the checks must come before any tokenizing)
# --------------------------------------------------------------------------------------

class NoTokenizing:
    image_token = "<image>"

    def apply_chat_template(self, *args, **kwargs):
        raise AssertionError("the prompt reached the chat template / tokenizer")

    __call__ = apply_chat_template


@pytest.mark.parametrize("prompts, message", [
    ([b"What?"], "prompt 0: expected text (str), got bytes"),
    (["fine", "caf\udce9?"], "prompt 1: not valid UTF-8 text (undecodable byte at character 3)"),
    (["Look at <image> here"], "prompt 0: contains the image placeholder '<image>'"),
    (["   "], "prompt 0: expected a non-empty string"),
    ([None], "prompt 0: expected a non-empty string, got NoneType"),
    (["x" * (512 * MAX_CHARS_PER_TOKEN + 1)], "prompt 0: 16,385 characters; at most 16,384"),
])
def test_bad_prompts_are_refused_before_tokenizing(prompts, message):
    bounds = InputBounds(image_token_id=4, num_visual=576, max_text_tokens=512)
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")):
        prepare_inputs(NoTokenizing(), [make_images(1)[0]] * len(prompts), prompts, bounds=bounds)


@pytest.mark.parametrize("images, prompts, message", [
    ([], [], "images/prompts: expected at least one image and prompt, got 0 images and 0 prompts"),
    ([None], [QUESTION], "image 0: expected a PIL image"),
    ("not a list", [QUESTION], "images: expected a list"),
])
def test_bad_batches_are_refused(images, prompts, message):
    with pytest.raises(InputError, match=message):
        prepare_inputs(NoTokenizing(), images, prompts)


def test_bounds_come_from_the_artifact(artifacts):  # noqa: F811
    import json

    from sparsevlm.export.profiles import MAX_NEW_TOKENS, SHARED_RANGES

    manifest = json.loads((artifacts(ARTIFACT) / "manifest.json").read_text())
    bounds = InputBounds.from_manifest(manifest)
    assert bounds.max_text_tokens == SHARED_RANGES["text_len"][2]
    assert bounds.max_prefix_tokens == SHARED_RANGES["prefix_len"][2]
    assert bounds.max_new_tokens == MAX_NEW_TOKENS
    assert bounds.max_positions == 2048  # the demo model's max_position_embeddings
    assert bounds.vocab_size == manifest["model"]["vocab_size"]


def test_budget_true_is_not_one_token():
    from sparsevlm.methods.config import resolve
    with pytest.raises(ConfigError, match="budget: expected a positive integer, got True"):
        resolve(SparseVLMConfig(method="fastervlm", budget=True), 22)
    assert resolve(SparseVLMConfig(method="fastervlm", budget=1), 22).fastervlm_keep == 1


# --------------------------------------------------------------------------------------
# The PyTorch API (SparseLlava on the demo checkpoint)
# --------------------------------------------------------------------------------------

pytestmark = pytest.mark.usefixtures("torch_single_thread")


@pytest.fixture(scope="module")
def vlm(demo_dir):
    return SparseLlava.from_pretrained(str(demo_dir), SparseVLMConfig(method="fastervlm", budget=64))


@pytest.fixture(scope="module")
def encoded(vlm):
    return vlm.prepare(make_images(2), [QUESTION, "How many shapes are there? Answer in one word."])


def test_api_rejects_bad_pixel_values(vlm, encoded):
    ids, pixels = encoded["input_ids"], encoded["pixel_values"]
    nan_row = pixels.clone()
    nan_row[1] = float("nan")
    with pytest.raises(InputError, match="pixel_values: row 1 holds NaN or infinite values"):
        vlm.generate(ids, nan_row, max_new_tokens=2)
    raw = torch.from_numpy(np.stack([np.asarray(i) for i in make_images(2)])).permute(0, 3, 1, 2).contiguous()
    with pytest.raises(InputError, match="pixel_values: expected processor-normalised floats .* got torch.uint8"):
        vlm.generate(ids, raw, max_new_tokens=2)
    with pytest.raises(InputError, match="pixel_values: row 0 channel 0 has values in .* outside the normalised"):
        vlm.generate(ids, raw.float(), max_new_tokens=2)
    with pytest.raises(InputError, match=r"pixel_values: expected shape \(2, 3, 336, 336\)"):
        vlm.generate(ids, pixels[:1], max_new_tokens=2)


def test_api_rejects_bad_token_ids(vlm, encoded):
    ids, pixels = encoded["input_ids"], encoded["pixel_values"]
    vocab = vlm.model.config.text_config.vocab_size
    for bad, where in ((-5, 0), (vocab, 3)):
        rows = [list(ids[0]), list(ids[1])]
        rows[1][where] = bad
        with pytest.raises(InputError, match=f"input_ids: row 1 has token id {bad} at position {where}; expected 0 <= id < {vocab}"):
            vlm.generate(rows, pixels, max_new_tokens=2)
    with pytest.raises(InputError, match=r"input_ids: expected at least one prompt \(batch of 0\)"):
        vlm.generate([], pixels[:0], max_new_tokens=2)
    with pytest.raises(InputError, match="input_ids: expected integer token ids, got float32"):
        vlm.generate(torch.tensor([ids[0]], dtype=torch.float32), pixels[:1], max_new_tokens=2)


def test_api_padded_tensor_needs_its_mask_and_then_answers_as_lists(vlm, encoded):
    ids, pixels = encoded["input_ids"], encoded["pixel_values"]
    width = max(map(len, ids))
    pad = vlm.pad_id
    padded = torch.tensor([row + [pad] * (width - len(row)) for row in ids])
    mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in ids])
    short = int(np.argmin([len(r) for r in ids]))
    with pytest.raises(InputError, match=f"input_ids: row {short} holds the pad token \\(id {pad}\\)"):
        vlm.generate(padded, pixels, max_new_tokens=2)
    want = vlm.generate(ids, pixels, max_new_tokens=3).sequences
    got = vlm.generate(padded, pixels, max_new_tokens=3, attention_mask=mask).sequences
    assert torch.equal(got, want)


def test_api_bounds_new_tokens_by_positions(vlm, encoded):
    ids, pixels = encoded["input_ids"][:1], encoded["pixel_values"][:1]
    prompt = len(ids[0])  # prepare() expands the placeholder to the 576 visual tokens
    assert ids[0].count(vlm.model.config.image_token_id) == 576
    with pytest.raises(InputError, match=f"= {prompt + 5000} positions; the model has 2048"):
        vlm.generate(ids, pixels, max_new_tokens=5000)
    for bad in (True, 2.5, 0):
        with pytest.raises(InputError, match="max_new_tokens: expected"):
            vlm.generate(ids, pixels, max_new_tokens=bad)


def test_api_numpy_image_equals_pil_image(vlm):
    image = make_images(1)[0]
    from_numpy = vlm.prepare([np.asarray(image)], [QUESTION])
    from_pil = vlm.prepare([image], [QUESTION])
    assert from_numpy["input_ids"] == from_pil["input_ids"]
    assert torch.equal(from_numpy["pixel_values"], from_pil["pixel_values"])


# --------------------------------------------------------------------------------------
# The runtime Pipeline (onnxruntime) and sparsevlm-run
# --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pipe(artifacts, pipelines):  # noqa: F811
    return pipelines(artifacts(ARTIFACT), "onnxruntime")


def test_pipeline_bounds(pipe):
    image = make_images(1)[0]
    with pytest.raises(InputError, match=r"max_new_tokens: expected 1..1024 \(the artifact's decode profile\), got 100000"):
        pipe.generate([image], [QUESTION], max_new_tokens=100000)
    with pytest.raises(InputError, match=r"prompt 0: 30\d\d tokens after the image .* at most 512 \(text_len\)"):
        pipe.generate([image], ["red blue " * 1500], max_new_tokens=2)
    with pytest.raises(InputError, match="positions; the model has 2048"):  # 512 text + 576 + 1024 > 2048
        pipe.generate([image], ["red " * 480], max_new_tokens=1024)
    with pytest.raises(InputError, match="prompt 0: 98,000 characters"):
        pipe.generate([image], ["x" * 98000], max_new_tokens=2)
    ids = pipe.prepare([image], [QUESTION])["input_ids"]
    from sparsevlm.methods.generation import SamplingParams
    with pytest.raises(InputError, match="input_ids: row 0 has token id -5"):  # ONNX Runtime would wrap it
        pipe.generate_ids([[-5] + ids[0]], pipe.prepare([image], [QUESTION])["pixel_values"], SamplingParams(2))


def test_pipeline_answers_16_bit_and_float_images_as_their_8_bit_pixels(pipe):
    grey = grey8()
    want = pipe.generate([Image.fromarray(rgb_of(grey))], [QUESTION], max_new_tokens=3).token_ids
    sixteen = encode(Image.fromarray(grey.astype(np.uint16) * 257))
    floats = encode(Image.fromarray(grey.astype(np.float32) / 255.0), "TIFF")
    assert pipe.generate([sixteen, floats], [QUESTION, QUESTION], max_new_tokens=3).token_ids == want * 2


def _run(argv, capsys):
    status = run_main(argv)
    err = capsys.readouterr().err
    return status, err


def test_sparsevlm_run_bad_inputs_exit_2_with_one_line(artifacts, tmp_path, capsys):  # noqa: F811
    artifact = str(artifacts(ARTIFACT))
    good = tmp_path / "good.png"
    make_images(1)[0].save(good)
    thin = tmp_path / "thin.png"
    Image.new("RGB", (1, 5000)).save(thin)
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header_only(20000, 20000))
    cases = [
        (["--image", str(bomb), "--prompt", QUESTION], "more than 50,000,000 pixels"),
        (["--image", str(thin), "--prompt", QUESTION], "aspect ratio of 5000:1"),
        (["--image", str(good), "--prompt", "see <image> here"], "contains the image placeholder"),
        (["--image", str(good), "--prompt", "caf\udce9?"], "prompt 0: not valid UTF-8"),
        (["--image", str(good), "--prompt", QUESTION, "--max-new-tokens", "100000"], "max_new_tokens: expected 1..1024"),
        (["--image", str(good), "--prompt", "red blue " * 1500], "tokens after the image"),
    ]
    for args, message in cases:
        status, err = _run(["--artifact", artifact, *args], capsys)
        lines = err.strip().splitlines()
        assert status == 2 and "Traceback" not in err, (args[-1][:40], err)
        assert lines[-1].startswith("sparsevlm-run: error: ") and message in lines[-1], err


def test_sparsevlm_run_subprocess_non_utf8_prompt_and_bomb(artifacts, tmp_path):  # noqa: F811
    """The installed command, with a prompt that is not UTF-8 as the shell passes it (bytes)."""
    artifact = str(artifacts(ARTIFACT))
    good = tmp_path / "good.png"
    make_images(1)[0].save(good)
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header_only(20000, 20000))
    command = Path(sys.executable).parent / "sparsevlm-run"
    for args, message in (([b"--image", str(good).encode(), b"--prompt", b"caf\xe9?"], "not valid UTF-8"),
                          ([b"--image", str(bomb).encode(), b"--prompt", b"hi"], "more than 50,000,000 pixels")):
        done = subprocess.run([str(command).encode(), b"--artifact", artifact.encode(), *args], capture_output=True,
                              timeout=600)
        err = done.stderr.decode(errors="replace")
        assert done.returncode == 2 and "Traceback" not in err, err
        assert err.strip().splitlines()[-1].startswith("sparsevlm-run: error: ") and message in err
