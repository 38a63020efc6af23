"""`Pipeline`: an exported artifact + a backend -> answers, with the profile planner between
segments. The generation loop itself is the one in sparsevlm.methods.generation."""

from __future__ import annotations

import io
import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator

import torch

from sparsevlm.methods import generation
from sparsevlm.methods.generation import InputError, SamplingParams
from sparsevlm.methods.model import prepare_inputs

from .artifact import Artifact
from .backends import BACKENDS, OnnxRuntimeExecutor, TensorRTExecutor, torch_executor
from .profiles import ProfilePlanner


def load_image(image):
    """A PIL RGB image from a PIL image, a file path or encoded bytes; InputError otherwise."""
    from PIL import Image, UnidentifiedImageError
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    try:
        if isinstance(image, (bytes, bytearray, memoryview)):
            source, name = io.BytesIO(bytes(image)), f"image bytes ({len(image)} bytes)"
        else:
            source, name = Path(image), f"image file {image}"
            if not source.exists():
                raise InputError(f"{name} does not exist")
        with Image.open(source) as opened:
            return opened.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise InputError(f"{name} is not a decodable image ({type(error).__name__})") from None


@dataclass
class RunOutput:
    texts: list[str]
    token_ids: list[list[int]]
    kept_per_layer: list[list[int]]
    trace: dict
    timings: dict
    profiles: list[dict] = field(default_factory=list)
    accounting: dict = field(default_factory=dict)


class Pipeline:
    def __init__(self, artifact: Artifact, executor, backend: str):
        self.artifact, self.executor, self.backend = artifact, executor, backend
        self.planner = ProfilePlanner(artifact.manifest)
        self.processor = artifact.processor()
        self.model_info = info = artifact.manifest["model"]
        # What the accounting needs of the language model (FLOPs per layer), from the manifest.
        self.text_shape = SimpleNamespace(num_hidden_layers=info["num_layers"], hidden_size=info["hidden_size"],
                                          intermediate_size=info["intermediate_size"])

    @classmethod
    def load(cls, artifact_dir: str | Path, backend: str = "onnxruntime", *, model: str | None = None,
             plugin_library: str | None = None, device: str = "cpu", threads: int = 0) -> "Pipeline":
        if backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
        artifact = Artifact.load(artifact_dir)
        if backend == "onnxruntime":
            executor = OnnxRuntimeExecutor(artifact, threads=threads)
        elif backend == "torch":
            executor = torch_executor(artifact, model, device)
        else:
            executor = TensorRTExecutor(artifact, plugin_library)
        return cls(artifact, executor, backend)

    def _plan_segment(self, index: int, info: dict) -> None:
        """Between segments: choose the profile for the visual width the method asked for."""
        decision, inputs = info["decision"], info["inputs"]
        choice = self.planner.choose(index, decision.width)
        if choice.padded_width != decision.width:
            inputs["visual_width"] = torch.zeros(choice.padded_width, dtype=torch.long)
            decision.width = choice.padded_width
        if hasattr(self.executor, "select_profile"):
            self.executor.select_profile(f"segment_{index}", choice.profile)

    def generate_ids(self, input_ids: list[list[int]], pixel_values: torch.Tensor, params: SamplingParams,
                     on_token=None) -> generation.GenerationOutput:
        self.planner.reset()
        info = self.model_info
        out = generation.generate(self.executor, self.artifact.plan, input_ids, pixel_values,
                                  image_token_id=info["image_token_id"], image_size=info["image_size"],
                                  text_config=self.text_shape, params=params, pad_id=info["pad_token_id"],
                                  on_token=on_token, on_segment=self._plan_segment)
        out.profiles = [c.to_json() for c in self.planner.choices]
        return out

    def generate(self, images, prompts: list[str], max_new_tokens: int = 32, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int | None = None, stop_token_ids=None, on_token=None) -> RunOutput:
        images = [load_image(i) for i in images]
        tokenizer = self.processor.tokenizer
        stops = tuple(stop_token_ids) if stop_token_ids is not None else (tokenizer.eos_token_id,)
        params = SamplingParams(max_new_tokens, temperature, top_p, seed, stops)
        inputs = prepare_inputs(self.processor, images, prompts)
        out = self.generate_ids(inputs["input_ids"], inputs["pixel_values"], params, on_token)
        token_ids = [_until_stop(row, stops) for row in out.sequences.tolist()]
        return RunOutput(texts=tokenizer.batch_decode(token_ids, skip_special_tokens=True), token_ids=token_ids,
                         kept_per_layer=[[layer["keep_count"][row] for layer in out.trace["layers"]]
                                         for row in range(len(token_ids))],
                         trace=out.trace, timings=out.timings, profiles=out.profiles, accounting=out.accounting)

    def stream(self, images, prompts: list[str], **kwargs) -> Iterator[list[int]]:
        """Like `generate`, as an iterator over each step's tokens (one per row, pad after a
        row stopped); `StopIteration.value` is the RunOutput."""
        return _stream(self.generate, images=images, prompts=prompts, **kwargs)


def _stream(generate, **kwargs) -> Iterator[list[int]]:
    """Run `generate(on_token=...)` in a thread and yield each step's tokens (one per row);
    the generator's return value is the final RunOutput. Errors surface in the caller."""
    events: queue.Queue = queue.Queue()

    def work():
        try:
            events.put(("done", generate(on_token=lambda step, tokens: events.put(("token", tokens.tolist())), **kwargs)))
        except BaseException as error:  # re-raised in the consumer's thread
            events.put(("error", error))

    threading.Thread(target=work, daemon=True).start()
    while True:
        kind, value = events.get()
        if kind == "token":
            yield value
        elif kind == "error":
            raise value
        else:
            return value


def _until_stop(row: list[int], stops: tuple[int, ...]) -> list[int]:
    for i, token in enumerate(row):
        if token in stops:
            return row[:i + 1]
    return row
