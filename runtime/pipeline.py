"""`Pipeline`: an exported artifact + a backend -> answers. The generation loop itself is the
one in sparsevlm.methods.generation; between segments it asks the artifact's profile rule
(`SegmentProfiles`, sparsevlm.methods.profiles) which width to run, and returns the choices
with the tokens. A Pipeline keeps no state between calls: several threads may call
`generate` on one Pipeline at once (the executors' own calls are thread-safe)."""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from sparsevlm.methods import generation
from sparsevlm.methods.generation import SamplingParams
from sparsevlm.methods.inputs import InputBounds, load_image, prepare_inputs  # noqa: F401 - load_image: API
from sparsevlm.methods.spec import ModelSpec

from .artifact import Artifact
from .backends import BACKENDS, OnnxRuntimeExecutor, TensorRTExecutor, torch_executor
from .profiles import SegmentProfiles


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
        # Read-only configuration: the per-segment profiles and the rule that picks one.
        self.profile_policy = SegmentProfiles.from_manifest(artifact.manifest)
        self.processor = artifact.processor()
        # The model's facts (layers and widths for the accounting, image token, pad id), from the manifest.
        self.spec: ModelSpec = artifact.spec
        # What a request may contain (docs/inputs.md): the profiles' prefix/text lengths, the
        # decode profile's new tokens, the vocabulary, the model's positions.
        self.bounds = InputBounds.from_manifest(artifact.manifest, self.processor)

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

    def generate_ids(self, input_ids: list[list[int]], pixel_values: torch.Tensor, params: SamplingParams,
                     on_token=None, image_sizes=None) -> generation.GenerationOutput:
        """Generate from token ids and pixel values (checked against `self.bounds` first);
        LLaVA-NeXT artifacts also take each image's (height, width) in `image_sizes`."""
        input_ids = self.bounds.check_ids(input_ids)
        self.bounds.check_new_tokens(params.max_new_tokens)
        self.bounds.check_lengths(input_ids, params.max_new_tokens)
        self.bounds.check_pixel_values(pixel_values, len(input_ids), self.spec.image_size)
        return generation.generate(self.executor, self.artifact.plan, input_ids, pixel_values, spec=self.spec,
                                   params=params, on_token=on_token, width_policy=self.profile_policy.choose,
                                   image_sizes=image_sizes)

    def prepare(self, images, prompts: list[str], max_new_tokens: int = 32) -> dict:
        """Check and encode requests (docs/inputs.md): InputError naming the input and row for
        a bad image, prompt or length, before any graph runs. The Triton model checks each
        request with this, so one bad request never fails the others of its batch."""
        max_new_tokens = self.bounds.check_new_tokens(max_new_tokens)
        return prepare_inputs(self.processor, images, prompts, bounds=self.bounds, max_new_tokens=max_new_tokens)

    def generate(self, images, prompts: list[str], max_new_tokens: int = 32, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int | None = None, stop_token_ids=None, on_token=None) -> RunOutput:
        return self.generate_prepared([self.prepare(images, prompts, max_new_tokens)], max_new_tokens, temperature,
                                      top_p, seed, stop_token_ids, on_token)

    def generate_prepared(self, prepared: list[dict], max_new_tokens: int = 32, temperature: float = 0.0,
                          top_p: float = 1.0, seed: int | None = None, stop_token_ids=None,
                          on_token=None) -> RunOutput:
        """`generate` for requests already checked and encoded by `prepare`, run as one batch
        (their rows in order). Each image and prompt is encoded on its own, so this is the
        batch `generate` would build from the same rows."""
        input_ids = [ids for inputs in prepared for ids in inputs["input_ids"]]
        if self.spec.anyres:  # requests' tile stacks differ in length
            from sparsevlm.methods.anyres import stack_pixel_values
            pixel_values = stack_pixel_values([inputs["pixel_values"] for inputs in prepared])
            image_sizes = [tuple(size) for inputs in prepared for size in inputs["image_sizes"].tolist()]
        elif self.spec.mrope:  # Qwen2.5-VL: every image's patches, and each image's patch grid
            pixel_values = torch.cat([inputs["pixel_values"] for inputs in prepared])
            image_sizes = torch.cat([inputs["image_grid_thw"] for inputs in prepared])
        else:
            pixel_values, image_sizes = torch.cat([inputs["pixel_values"] for inputs in prepared]), None
        tokenizer = self.processor.tokenizer
        stops = tuple(stop_token_ids) if stop_token_ids is not None else (tokenizer.eos_token_id,)
        params = SamplingParams(max_new_tokens, temperature, top_p, seed, stops)
        out = self.generate_ids(input_ids, pixel_values, params, on_token, image_sizes)
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
