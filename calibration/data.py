"""Calibration samples: a JSONL file of {"image": path, "prompt": text}, or the built-in
synthetic set (deterministic shape images and prompts of varied length).

Prompts are the user's question: the model's chat template inserts the image placeholder,
so a prompt must not contain '<image>'. With `raw_prompts=True` prompts are complete,
already templated texts and each must contain the placeholder exactly where the image goes.
Every problem is reported before any model runs, naming the file and line.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from PIL import Image, ImageDraw

from sparsevlm.methods.generation import InputError
from sparsevlm.methods.inputs import IMAGE_PLACEHOLDER, load_image
SYNTHETIC_VERSION = 1  # bump when the generator changes, so resumed runs do not mix sets
SYNTHETIC_SIZE = 336


class CalibrationDataError(ValueError):
    """The calibration set is unusable; the message names the file and line."""


@dataclass(frozen=True)
class CalibrationSample:
    index: int
    prompt: str
    origin: str  # where it came from, for messages: "data.jsonl:3" or "synthetic:7"
    key: str  # content hash of image + prompt: a resumed run recomputes a changed sample
    load_image: Callable[[], Image.Image]


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()[:16]


def _check_prompt(prompt: str, raw_prompts: bool, origin: str) -> None:
    if raw_prompts and IMAGE_PLACEHOLDER not in prompt:
        raise CalibrationDataError(f"{origin}: raw prompt has no image placeholder {IMAGE_PLACEHOLDER!r}; "
                                   "a raw (already templated) prompt must mark where the image goes")
    if not raw_prompts and IMAGE_PLACEHOLDER in prompt:
        raise CalibrationDataError(f"{origin}: prompt contains {IMAGE_PLACEHOLDER!r}; prompts are the question "
                                   "and the chat template inserts the image (remove it, or pass raw prompts)")


def _decode_image(data: bytes, path: Path, origin: str) -> Image.Image:
    """The image as every entry point decodes it (sparsevlm.methods.inputs.load_image: size
    limits, EXIF orientation, 16-bit / float / alpha conversion to 8-bit RGB)."""
    try:
        return load_image(data, "the file")
    except InputError as error:
        raise CalibrationDataError(f"{origin}: image {path} is not a readable image ({error})") from None


def _image_loader(path: Path, origin: str) -> Callable[[], Image.Image]:
    def load() -> Image.Image:
        try:
            data = path.read_bytes()
        except OSError as error:
            raise CalibrationDataError(f"{origin}: cannot read image {path} ({error})") from error
        return _decode_image(data, path, origin)
    return load


def _parse_line(text: str, origin: str) -> dict:
    try:
        entry = json.loads(text)
    except json.JSONDecodeError as error:
        raise CalibrationDataError(f"{origin}: invalid JSON ({error.msg} at column {error.colno})") from error
    if not isinstance(entry, dict):
        raise CalibrationDataError(f"{origin}: expected a JSON object with 'image' and 'prompt', "
                                   f"got {type(entry).__name__}")
    missing = [k for k in ("image", "prompt") if k not in entry]
    if missing:
        raise CalibrationDataError(f"{origin}: missing key(s) {', '.join(repr(k) for k in missing)}; "
                                   "each line needs {\"image\": path, \"prompt\": text}")
    for key in ("image", "prompt"):
        if not isinstance(entry[key], str) or not entry[key].strip():
            raise CalibrationDataError(f"{origin}: {key!r} must be a non-empty string, got {entry[key]!r}")
    return entry


def _sample_from_entry(entry: dict, index: int, base_dir: Path, origin: str, raw_prompts: bool) -> CalibrationSample:
    _check_prompt(entry["prompt"], raw_prompts, origin)
    path = Path(entry["image"]).expanduser()
    path = path if path.is_absolute() else base_dir / path
    if not path.is_file():
        raise CalibrationDataError(f"{origin}: image file not found: {path}")
    data = path.read_bytes()
    _decode_image(data, path, origin)  # fail now, not an hour into the run
    key = _digest(data, entry["prompt"].encode())
    return CalibrationSample(index, entry["prompt"], origin, key, _image_loader(path, origin))


def load_jsonl(path: str | Path, raw_prompts: bool = False) -> list[CalibrationSample]:
    """Samples from a JSONL file; relative image paths are resolved against its directory.
    Blank lines are skipped; sample indices count the samples, origins name the line."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CalibrationDataError(f"data: {path} does not exist (expected a JSONL file)")
    samples = []
    with path.open(encoding="utf-8") as lines:
        for number, text in enumerate(lines, start=1):
            if not text.strip():
                continue
            origin = f"{path}:{number}"
            entry = _parse_line(text, origin)
            samples.append(_sample_from_entry(entry, len(samples), path.parent, origin, raw_prompts))
    if not samples:
        raise CalibrationDataError(f"data: {path} has no samples (empty calibration set)")
    return samples


# --------------------------------------------------------------------------------------
# Synthetic set
# --------------------------------------------------------------------------------------

_COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 70, 220), "yellow": (240, 210, 40),
            "black": (10, 10, 10), "white": (250, 250, 250), "orange": (250, 140, 20), "purple": (140, 50, 170)}
_SHAPES = ("circle", "square", "triangle", "line")
# Questions from one word to several sentences: the text length (the raters) drives the rank.
_QUESTIONS = (
    "Color?",
    "What is in the image?",
    "Is there a {colour} {shape}?",
    "How many objects are there?",
    "What color is the large {shape}?",
    "Where is the {colour} {shape}, left or right?",
    "Describe the picture in detail.",
    "How many {shape}s are there? Answer the question using a single word or phrase.",
    "Is the {colour} {shape} next to a {shape}? What color is the background? Describe the image.",
    "The image shows a {colour} {shape} on a background. What shape is on the left and what is on "
    "the right? How many objects are there, and what color is each of them? Describe the picture in detail.",
)


def _draw_shape(draw: ImageDraw.ImageDraw, rng: random.Random, shape: str, colour: tuple) -> None:
    size = rng.randrange(24, 140)
    x, y = rng.randrange(0, SYNTHETIC_SIZE - size), rng.randrange(0, SYNTHETIC_SIZE - size)
    if shape == "circle":
        draw.ellipse([x, y, x + size, y + size], fill=colour)
    elif shape == "square":
        draw.rectangle([x, y, x + size, y + size], fill=colour)
    elif shape == "triangle":
        draw.polygon([(x, y + size), (x + size, y + size), (x + size // 2, y)], fill=colour)
    else:
        draw.line([(x, y), (x + size, y + rng.randrange(-size, size))], fill=colour, width=rng.randrange(2, 10))


def synthetic_image(seed: int, index: int) -> Image.Image:
    rng = random.Random(f"image/{SYNTHETIC_VERSION}/{seed}/{index}")
    names = list(_COLOURS)
    image = Image.new("RGB", (SYNTHETIC_SIZE, SYNTHETIC_SIZE), _COLOURS[rng.choice(names)])
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randrange(1, 7)):
        _draw_shape(draw, rng, rng.choice(_SHAPES), _COLOURS[rng.choice(names)])
    return image


def synthetic_prompt(seed: int, index: int) -> str:
    rng = random.Random(f"prompt/{SYNTHETIC_VERSION}/{seed}/{index}")
    return rng.choice(_QUESTIONS).format(colour=rng.choice(list(_COLOURS)), shape=rng.choice(_SHAPES))


def synthetic_samples(count: int, seed: int = 0) -> list[CalibrationSample]:
    """`count` deterministic samples: coloured shapes on a plain background, questions of
    varied length. The same (count, seed) always gives the same set."""
    if not isinstance(count, int) or count < 1:
        raise CalibrationDataError(f"synthetic: expected a positive number of samples, got {count!r}")
    samples = []
    for index in range(count):
        prompt = synthetic_prompt(seed, index)
        key = _digest(f"synthetic/{SYNTHETIC_VERSION}/{seed}/{index}".encode(), prompt.encode())
        samples.append(CalibrationSample(index, prompt, f"synthetic:{index}", key,
                                         lambda seed=seed, index=index: synthetic_image(seed, index)))
    return samples
