"""Example client for a repository written by `sparsevlm-triton` (tritonclient, HTTP or gRPC).

    python -m sparsevlm.runtime.triton.client --url 127.0.0.1:8000 --image cat.png --prompt "What is in the image?"
    python -m sparsevlm.runtime.triton.client --protocol grpc --url 127.0.0.1:8001 --image cat.png \
        --prompt "Describe it." --stream            # tokens as they are generated (the _stream model)

Python:

    from sparsevlm.runtime.triton.client import SparseVLMClient
    with SparseVLMClient("127.0.0.1:8001", protocol="grpc") as client:
        answer = client.generate(open("cat.png", "rb").read(), "What is in the image?", max_new_tokens=16)
        print(answer.text, answer.token_ids, answer.kept_per_layer)
        for piece in client.stream(open("cat.png", "rb").read(), "Describe it."):
            print(piece.text, end="", flush=True)

Needs `pip install "tritonclient[http,grpc]"` (the project's `triton` extra).
"""

from __future__ import annotations

import argparse
import queue
import sys
import threading
from dataclasses import dataclass, field

import numpy as np

DEFAULT_MODEL = "sparsevlm"


@dataclass
class Answer:
    text: str
    token_ids: list[int]
    kept_per_layer: list[int] = field(default_factory=list)


@dataclass
class Piece:
    """One streamed response: the new token(s) and text piece; the last has `final` and the keep counts."""
    token_ids: list[int]
    text: str
    final: bool = False
    kept_per_layer: list[int] = field(default_factory=list)


class TritonRequestError(RuntimeError):
    """The server answered with an error (its message is kept). `status`: the protocol's
    status ("400" over HTTP, "StatusCode.INVALID_ARGUMENT" over gRPC for a bad request)."""

    def __init__(self, message: str, status: str | None = None):
        super().__init__(message)
        self.status = status


def _module(protocol: str):
    if protocol == "http":
        import tritonclient.http as module
    elif protocol == "grpc":
        import tritonclient.grpc as module
    else:
        raise ValueError(f"protocol: expected 'http' or 'grpc', got {protocol!r}")
    return module


def build_inputs(module, image: bytes, prompt: str, max_new_tokens: int | None = None,
                 temperature: float | None = None, top_p: float | None = None, seed: int | None = None) -> list:
    """The request tensors for one row ([1, 1] each; the first dimension is the batch)."""
    values = [("image", np.array([[image]], dtype=np.object_), "BYTES"),
              ("prompt", np.array([[prompt.encode("utf-8")]], dtype=np.object_), "BYTES")]
    for name, value, dtype, triton in (("max_new_tokens", max_new_tokens, np.int32, "INT32"),
                                       ("temperature", temperature, np.float32, "FP32"),
                                       ("top_p", top_p, np.float32, "FP32"), ("seed", seed, np.int64, "INT64")):
        if value is not None:
            values.append((name, np.array([[value]], dtype=dtype), triton))
    inputs = []
    for name, array, triton in values:
        tensor = module.InferInput(name, list(array.shape), triton)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def _outputs(module, names):
    return [module.InferRequestedOutput(n) for n in names]


class SparseVLMClient:
    def __init__(self, url: str = "127.0.0.1:8000", protocol: str = "http", model: str = DEFAULT_MODEL,
                 timeout_s: float = 300.0, concurrency: int = 1):
        self.protocol, self.model, self.timeout_s = protocol, model, timeout_s
        self.module = _module(protocol)
        if protocol == "http":
            self.client = self.module.InferenceServerClient(url, concurrency=concurrency, connection_timeout=timeout_s,
                                                            network_timeout=timeout_s)
        else:
            self.client = self.module.InferenceServerClient(url)

    def ready(self) -> bool:
        return self.client.is_server_ready() and self.client.is_model_ready(self.model)

    def generate(self, image: bytes, prompt: str, **params) -> Answer:
        """One request to the generate model. Raises TritonRequestError with the server's message."""
        from tritonclient.utils import InferenceServerException

        inputs = build_inputs(self.module, image, prompt, **params)
        kwargs = {"client_timeout": self.timeout_s} if self.protocol == "grpc" else {}
        try:
            result = self.client.infer(self.model, inputs, outputs=_outputs(self.module, ["text", "token_ids",
                                                                                           "kept_per_layer"]), **kwargs)
        except InferenceServerException as error:
            raise TritonRequestError(error.message(), error.status()) from None
        ids = result.as_numpy("token_ids")[0]
        return Answer(result.as_numpy("text")[0][0].decode("utf-8"), [int(t) for t in ids if t >= 0],
                      [int(k) for k in result.as_numpy("kept_per_layer")[0]])

    def stream(self, image: bytes, prompt: str, model: str | None = None, **params):
        """Yield Pieces from the decoupled `<model>_stream` model (gRPC streaming), in order."""
        if self.protocol != "grpc":
            raise ValueError("stream: streaming needs the gRPC protocol")
        model = model or f"{self.model}_stream"
        responses: queue.Queue = queue.Queue()
        self.client.start_stream(callback=lambda result, error: responses.put((result, error)))
        try:
            self.client.async_stream_infer(model, build_inputs(self.module, image, prompt, **params),
                                           outputs=_outputs(self.module, ["text", "token_ids", "kept_per_layer"]))
            while True:
                try:
                    result, error = responses.get(timeout=self.timeout_s)
                except queue.Empty:
                    raise TritonRequestError(f"stream: no response within {self.timeout_s} s") from None
                if error is not None:
                    raise TritonRequestError(error.message() if hasattr(error, "message") else str(error))
                kept = result.as_numpy("kept_per_layer")
                ids = result.as_numpy("token_ids")
                text = result.as_numpy("text")
                piece = Piece([int(t) for t in ids.reshape(-1)] if ids is not None else [],
                              text.reshape(-1)[0].decode("utf-8") if text is not None else "",
                              final=kept is not None,
                              kept_per_layer=[int(k) for k in kept.reshape(-1)] if kept is not None else [])
                yield piece
                if piece.final:
                    return
        finally:
            self.client.stop_stream()

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> "SparseVLMClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ClientPool:
    """One SparseVLMClient per thread and protocol, for a bounded thread pool of callers
    (tritonclient's HTTP client must not be shared between threads). Close it when done."""

    def __init__(self, http_url: str, grpc_url: str, model: str = DEFAULT_MODEL, timeout_s: float = 600.0):
        self.urls, self.model, self.timeout_s = {"http": http_url, "grpc": grpc_url}, model, timeout_s
        self.local, self.clients, self.lock = threading.local(), [], threading.Lock()

    def get(self, protocol: str) -> SparseVLMClient:
        client = getattr(self.local, protocol, None)
        if client is None:
            client = SparseVLMClient(self.urls[protocol], protocol, self.model, timeout_s=self.timeout_s)
            setattr(self.local, protocol, client)
            with self.lock:
                self.clients.append(client)
        return client

    def close(self) -> None:
        with self.lock:
            for client in self.clients:
                client.close()
            self.clients.clear()

    def __enter__(self) -> "ClientPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sparsevlm.runtime.triton.client", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default=None, help="host:port (default 127.0.0.1:8000 for HTTP, :8001 for gRPC)")
    p.add_argument("--protocol", choices=["http", "grpc"], default="http")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--image", required=True, help="image file (PNG, JPEG, ...)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stream", action="store_true", help="stream tokens (gRPC; the <model>_stream model)")
    args = p.parse_args(argv)
    if args.stream:
        args.protocol = "grpc"
    url = args.url or ("127.0.0.1:8001" if args.protocol == "grpc" else "127.0.0.1:8000")
    image = open(args.image, "rb").read()
    params = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
              "seed": args.seed}
    with SparseVLMClient(url, args.protocol, args.model) as client:
        try:
            if args.stream:
                for piece in client.stream(image, args.prompt, **params):
                    if piece.final:
                        print(f"\nkept per layer: {piece.kept_per_layer}")
                    else:
                        print(piece.text, end="", flush=True)
            else:
                answer = client.generate(image, args.prompt, **params)
                print(answer.text)
                print(f"token ids: {answer.token_ids}\nkept per layer: {answer.kept_per_layer}")
        except TritonRequestError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
