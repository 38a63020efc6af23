"""`GenerateModel`: the Triton Python-backend model of sparsevlm generation in-process.

The `model.py` of every generate model of a repository (model_shim.py) hands its calls to
this class, once `sparsevlm` is on the stub's path:
- `<name>`         request/response with dynamic batching;
- `<name>_stream`  decoupled (config `model_transaction_policy { decoupled: true }`): one
                   response per generated token, then a final one with `kept_per_layer` (and the
                   rest of the text, if the last piece ended inside a UTF-8 sequence);
- the TensorRT flavour's orchestrator (`backend` parameter `triton-bls`): the runtime's
  generation loop with every graph executed as a BLS call to its `tensorrt_plan` model.

Config parameters (all strings): `artifact` (absolute, or relative to the repository),
`backend` (auto | onnxruntime | tensorrt | torch | triton-bls), `max_batch`, and for the
orchestrator `graph_models` (JSON {graph: model}); `sparsevlm_site_dirs` and
`serving_model` are the shim's.

It uses the public Pipeline API only: `Pipeline.load`, `Pipeline(artifact, executor,
backend)`, `prepare`, `generate_prepared` and the tokenizer of `processor`.

Batching: the dynamic batcher hands `execute` several requests. Greedy rows (temperature 0)
with the same max_new_tokens run as one batch of the runtime (rows are independent: per-row
keep counts, padding and masks). Sampled rows run per request, so a seed gives the same
tokens as an in-process `Pipeline.generate` call with that request's rows.

Bad requests: every request is checked on its own before any batch runs (`Pipeline.prepare`:
the input rules of docs/inputs.md, shared with the Python API and sparsevlm-run), so a bad
request gets its own error response and the good requests of the same batch their answers.
Client errors go back as INVALID_ARG (HTTP 400 / gRPC INVALID_ARGUMENT) with a one-line
message naming the input; anything else is INTERNAL with a one-line message, the traceback
going only to the server log. Nothing escapes `execute` (an exception there would fail
every request of the batch and send the server's traceback to each client).
"""

import json
import threading
import traceback
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils  # the stub's module: this file runs inside Triton only

from sparsevlm.runtime import Pipeline
from sparsevlm.runtime.artifact import Artifact

from .bls import TritonBLSExecutor

DEFAULTS = {"max_new_tokens": 32, "temperature": 0.0, "top_p": 1.0, "seed": None}


class RequestError(ValueError):
    """A request the model rejects (its message goes back to the client)."""


def _error(message, client=True):
    """A TritonError: INVALID_ARG for the client's mistakes, INTERNAL otherwise (older
    python backends take no code: then the server reports it as INTERNAL)."""
    message = " ".join(str(message).split())  # one line
    code = getattr(pb_utils.TritonError, "INVALID_ARG" if client else "INTERNAL", None)
    if code is None:
        return pb_utils.TritonError(message)
    return pb_utils.TritonError(message, code)


def _is_client_error(error):
    return isinstance(error, ValueError)  # RequestError, and the runtime's InputError and friends


def _scalar_rows(request, name, rows, cast):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return [DEFAULTS[name]] * rows
    values = tensor.as_numpy().reshape(-1)
    if values.size != rows:
        raise RequestError(f"{name}: expected one value per row ({rows}), got {values.size}")
    return [cast(v) for v in values]


def _bytes_rows(request, name):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        raise RequestError(f"{name}: missing required input")
    values = tensor.as_numpy().reshape(-1)
    if values.size == 0:
        raise RequestError(f"{name}: empty tensor")
    return [v if isinstance(v, bytes) else bytes(v) if not isinstance(v, str) else v.encode() for v in values]


def model_parameters(config: dict) -> dict:
    """The `parameters` of a parsed model config, as {key: string}."""
    return {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}


def artifact_path(args: dict, params: dict) -> Path:
    """The `artifact` parameter: absolute, or relative to the repository (`--copy-artifact`)."""
    artifact = Path(params["artifact"])
    if not artifact.is_absolute():
        artifact = Path(args["model_repository"]).resolve().parent / artifact  # model_repository: <repo>/<model>
    return artifact


class Row:
    __slots__ = ("request", "index", "inputs", "prompt", "params", "result")

    def __init__(self, request, index, inputs, prompt, params):
        # inputs: the row checked and encoded by Pipeline.prepare (input_ids, pixel_values)
        self.request, self.index, self.inputs, self.prompt, self.params = request, index, inputs, prompt, params
        self.result = None  # (text, token_ids, kept_per_layer)


class GenerateModel:
    """The TritonPythonModel interface (initialize / execute / finalize) over a Pipeline."""

    def initialize(self, args):
        self.model_config = config = json.loads(args["model_config"])
        params = model_parameters(config)
        artifact = artifact_path(args, params)
        self.name = args["model_name"]
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(config)
        self.max_batch = max(1, int(config.get("max_batch_size", 0)) or 1)
        backend = params.get("backend", "auto")
        if backend == "triton-bls":
            loaded = Artifact.load(str(artifact))
            self.pipe = Pipeline(loaded, TritonBLSExecutor(loaded, json.loads(params["graph_models"])), backend)
        elif backend == "auto":
            self.pipe = None
            if _cuda_available():
                try:
                    self.pipe = Pipeline.load(str(artifact), backend="tensorrt")
                    backend = "tensorrt"
                except Exception as error:  # no engines in the artifact, or no TensorRT: fall back
                    pb_utils.Logger.log_warn(f"{self.name}: tensorrt backend unavailable ({error}); using onnxruntime")
            if self.pipe is None:
                backend = "onnxruntime"
                self.pipe = Pipeline.load(str(artifact), backend=backend)
        else:
            self.pipe = Pipeline.load(str(artifact), backend=backend)
        self.backend = backend
        self.lock = threading.Lock()
        pb_utils.Logger.log_info(f"{self.name}: loaded {artifact} with backend {backend} "
                                 f"(decoupled={self.decoupled}, max_batch={self.max_batch})")

    # ----------------------------------------------------------------------------------
    def _parse(self, request):
        images = _bytes_rows(request, "image")
        prompts = _bytes_rows(request, "prompt")
        if len(images) != len(prompts):
            raise RequestError(f"image/prompt: expected one image per prompt, got {len(images)} and {len(prompts)}")
        rows = len(prompts)
        max_new = _scalar_rows(request, "max_new_tokens", rows, int)
        temps = _scalar_rows(request, "temperature", rows, float)
        top_ps = _scalar_rows(request, "top_p", rows, float)
        seeds = _scalar_rows(request, "seed", rows, lambda v: int(v))
        parsed = []
        for i in range(rows):
            where = f"row {i}: " if rows > 1 else ""
            try:
                prompt = prompts[i].decode("utf-8")
            except UnicodeDecodeError as error:
                raise RequestError(f"{where}prompt: not valid UTF-8 (byte {error.start}); send UTF-8 text") from None
            if not (temps[i] >= 0 and np.isfinite(temps[i])):
                raise RequestError(f"{where}temperature: expected a finite value >= 0, got {temps[i]}")
            if not 0 < top_ps[i] <= 1:
                raise RequestError(f"{where}top_p: expected a value in (0, 1], got {top_ps[i]}")
            try:
                # The shared input rules (docs/inputs.md): image decoding and limits, prompt
                # text and token bounds, max_new_tokens within the artifact's decode profile.
                inputs = self.pipe.prepare([images[i]], [prompt], max_new[i])
            except ValueError as error:
                raise RequestError(f"{where}{error}") from None
            parsed.append(Row(request, i, inputs, prompt,
                              {"max_new_tokens": max_new[i], "temperature": temps[i], "top_p": top_ps[i],
                               "seed": seeds[i]}))
        if len(parsed) > 1 and self.decoupled:
            raise RequestError(f"{self.name} streams one row per request; got {len(parsed)} rows")
        return parsed

    def _groups(self, rows):
        """Greedy rows batch across requests (keyed by max_new_tokens); sampled rows per request."""
        groups = {}
        for row in rows:
            p = row.params
            if p["temperature"] == 0:
                key = ("greedy", p["max_new_tokens"])
            else:
                key = ("sampled", id(row.request), p["max_new_tokens"], p["temperature"], p["top_p"], p["seed"])
            groups.setdefault(key, []).append(row)
        for key, members in groups.items():
            for start in range(0, len(members), self.max_batch):
                yield members[start:start + self.max_batch]

    def _generate(self, rows, on_token=None):
        p = rows[0].params
        with self.lock:
            out = self.pipe.generate_prepared([r.inputs for r in rows], max_new_tokens=p["max_new_tokens"],
                                              temperature=p["temperature"], top_p=p["top_p"], seed=p["seed"],
                                              on_token=on_token)
        for i, row in enumerate(rows):
            row.result = (out.texts[i], [int(t) for t in out.token_ids[i]], [int(k) for k in out.kept_per_layer[i]])
        return out

    # ----------------------------------------------------------------------------------
    def execute(self, requests):
        if self.decoupled:
            return self._execute_stream(requests)
        errors, rows = {}, []  # errors: request index -> TritonError
        for i, request in enumerate(requests):
            try:
                rows.extend(self._parse(request))
            except Exception as error:  # noqa: BLE001 - a request's own failure is its own response
                errors[i] = _failure(error)
        for group in self._groups(rows):
            try:
                self._generate(group)
            except Exception as error:  # noqa: BLE001 - isolate: rerun each request of the group alone
                if len({id(r.request) for r in group}) == 1:
                    errors.setdefault(_index(requests, group[0].request), _failure(error))
                    continue
                for request_id in {id(r.request) for r in group}:
                    alone = [r for r in group if id(r.request) == request_id]
                    try:
                        self._generate(alone)
                    except Exception as inner:  # noqa: BLE001
                        errors.setdefault(_index(requests, alone[0].request), _failure(inner))
        responses = []
        for i, request in enumerate(requests):
            if i in errors:
                responses.append(pb_utils.InferenceResponse(error=errors[i]))
                continue
            try:
                mine = sorted((r for r in rows if r.request is request), key=lambda r: r.index)
                responses.append(pb_utils.InferenceResponse(output_tensors=_outputs([r.result for r in mine])))
            except Exception as error:  # noqa: BLE001
                responses.append(pb_utils.InferenceResponse(error=_failure(error)))
        return responses

    def _execute_stream(self, requests):
        rows, senders = [], {}
        for request in requests:
            sender = senders[id(request)] = request.get_response_sender()
            try:
                rows.extend(self._parse(request))
            except Exception as error:  # noqa: BLE001 - a request's own failure is its own response
                sender.send(pb_utils.InferenceResponse(error=_failure(error)),
                            flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        tokenizer = self.pipe.processor.tokenizer
        stop_ids = {tokenizer.eos_token_id}  # generate_prepared's default stops
        for group in self._groups(rows):
            streamed = [[] for _ in group]
            finished = [False] * len(group)
            sent = [""] * len(group)

            def on_token(step, tokens, group=group, streamed=streamed, finished=finished, sent=sent):
                values = tokens.tolist() if hasattr(tokens, "tolist") else list(tokens)
                for j, row in enumerate(group):
                    if finished[j]:
                        continue
                    token = int(values[j])
                    streamed[j].append(token)
                    text = tokenizer.decode(streamed[j], skip_special_tokens=True)
                    piece = ""
                    if not text.endswith("\ufffd"):  # hold back an incomplete UTF-8 sequence
                        piece, sent[j] = text[len(sent[j]):], text
                    senders[id(row.request)].send(pb_utils.InferenceResponse(output_tensors=[
                        pb_utils.Tensor("token_ids", np.array([[token]], dtype=np.int64)),
                        pb_utils.Tensor("text", np.array([[piece.encode("utf-8")]], dtype=np.object_))]))
                    if token in stop_ids:
                        finished[j] = True

            try:
                self._generate(group, on_token=on_token)
            except Exception as error:  # noqa: BLE001
                for row in group:
                    senders[id(row.request)].send(pb_utils.InferenceResponse(error=_failure(error)),
                                                  flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                continue
            for j, row in enumerate(group):
                text, tokens, kept = row.result
                if streamed[j][:len(tokens)] != tokens:
                    error = f"internal: streamed tokens {streamed[j]} differ from the result {tokens}"
                    senders[id(row.request)].send(pb_utils.InferenceResponse(error=_error(error, client=False)),
                                                  flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                    continue
                senders[id(row.request)].send(pb_utils.InferenceResponse(output_tensors=[
                    pb_utils.Tensor("token_ids", np.zeros((1, 0), dtype=np.int64)),
                    pb_utils.Tensor("text", np.array([[text[len(sent[j]):].encode("utf-8")]], dtype=np.object_)),
                    pb_utils.Tensor("kept_per_layer", np.array([kept], dtype=np.int64))]),
                    flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None

    def finalize(self):
        self.pipe = None


def _outputs(results):
    width = max((len(r[1]) for r in results), default=0)
    ids = np.full((len(results), width), -1, dtype=np.int64)
    for i, (_, tokens, _) in enumerate(results):
        ids[i, :len(tokens)] = tokens
    layers = max((len(r[2]) for r in results), default=0)
    kept = np.full((len(results), layers), -1, dtype=np.int64)
    for i, (_, _, k) in enumerate(results):
        kept[i, :len(k)] = k
    text = np.array([[r[0].encode("utf-8")] for r in results], dtype=np.object_)
    return [pb_utils.Tensor("text", text), pb_utils.Tensor("token_ids", ids), pb_utils.Tensor("kept_per_layer", kept)]


def _index(requests, request):
    return next(i for i, r in enumerate(requests) if r is request)


def _failure(error):
    """The TritonError for a failed request: the client's mistake (a ValueError: RequestError,
    InputError, ...) as INVALID_ARG with its message; anything else as INTERNAL, one line,
    with the traceback in the server log only."""
    if _is_client_error(error):
        message = str(error) if isinstance(error, RequestError) else f"{type(error).__name__}: {error}"
        return _error(message, client=True)
    pb_utils.Logger.log_error(f"internal error: {traceback.format_exc()}")  # details in the server log
    return _error(f"internal error: {type(error).__name__}: {error}", client=False)


def _cuda_available():
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        return False
