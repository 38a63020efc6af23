"""Load test: N concurrent requests (HTTP and gRPC) against a real Triton server serving the
python-flavour repository of an artifact (default: the demo model, SparseVLM v1.5 budget 192).

    python benchmarks/bench_triton.py [--requests 1000] [--concurrency 16] [--instances 1]
        [--max-batch 8] [--queue-delay-us 5000] [--max-new-tokens 4] [--artifact DIR] [--json FILE]

The server is the nvidia-pytriton tritonserver on 127.0.0.1 (see runtime/triton/README.md; its
environment is $SPARSEVLM_TRITON_ENV or build/triton-env). Requests alternate between HTTP and
gRPC and cycle over 25 (image, prompt) pairs. Every answer is checked against the in-process
runtime (onnxruntime). Prints throughput, p50/p90/p99 latency per protocol, failures and
mismatches, and the server's batching statistics. Every loop is bounded (count and --timeout).
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

import numpy as np

PROMPTS = ["What is in the image?", "How many objects are there?", "What color is the large square?",
           "Is there a red circle? Answer yes or no.",
           "Look at this picture carefully and describe the shapes, colors and their positions."]


def make_images(count: int):
    from PIL import Image
    rng = np.random.RandomState(4321)
    out = []
    for _ in range(count):
        base = rng.rand(8, 8, 3)
        pixels = np.kron(base, np.ones((42, 42, 1))) * 0.7 + rng.rand(336, 336, 3) * 0.3
        buffer = io.BytesIO()
        Image.fromarray((pixels * 255).astype("uint8")).save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out


def percentile(values, q):
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--artifact", help="artifact directory (default: export the demo model to a temp dir)")
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--concurrency", type=int, default=16, help="client threads (bounded pool)")
    p.add_argument("--instances", type=int, default=1)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--queue-delay-us", type=int, default=5000)
    p.add_argument("--max-new-tokens", type=int, default=4)
    p.add_argument("--protocols", default="http,grpc")
    p.add_argument("--env", default=None, help="server environment (nvidia-pytriton, numpy<2)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds for the whole load phase")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)

    from sparsevlm.runtime import Pipeline
    from sparsevlm.runtime.triton.client import ClientPool
    from sparsevlm.runtime.triton.repository import write_repository
    from sparsevlm.runtime.triton.server import LocalTritonServer

    work = Path(tempfile.mkdtemp(prefix="bench-triton-"))
    artifact = args.artifact
    if artifact is None:
        from sparsevlm.export import export
        t0 = time.monotonic()
        artifact = export("demo", work / "artifact", method="sparsevlm", variant="v1.5", budgets=[192],
                          progress=False)[0]["path"]
        print(f"exported the demo artifact in {time.monotonic() - t0:.1f} s")
    repo = write_repository(artifact, work / "repo", instances=args.instances, max_batch=args.max_batch,
                            queue_delay_us=args.queue_delay_us, streaming=False)
    images = make_images(5)
    combos = [(i, q) for i in range(5) for q in range(len(PROMPTS))]
    protocols = args.protocols.split(",")
    params = {"max_new_tokens": args.max_new_tokens}

    pipe = Pipeline.load(artifact, backend="onnxruntime")
    t0 = time.monotonic()
    expected = {}
    for i, q in combos:
        out = pipe.generate([images[i]], [PROMPTS[q]], **params)
        expected[(i, q)] = (out.texts[0], out.token_ids[0], out.kept_per_layer[0])
    in_process = (time.monotonic() - t0) / len(combos)
    del pipe

    server = LocalTritonServer(repo.path, env=args.env, ready_timeout=600)
    server.start()
    pool_clients = ClientPool(server.http_url, server.grpc_url)

    def one(n):
        protocol = protocols[n % len(protocols)]
        key = combos[(n * 7) % len(combos)]
        start = time.monotonic()
        try:
            a = pool_clients.get(protocol).generate(images[key[0]], PROMPTS[key[1]], **params)
            ok = (a.text, a.token_ids, a.kept_per_layer) == expected[key]
            return protocol, time.monotonic() - start, None if ok else "mismatch"
        except Exception as error:  # noqa: BLE001 - counted
            return protocol, time.monotonic() - start, f"{type(error).__name__}: {error}"[:300]

    try:
        with ThreadPoolExecutor(max_workers=args.concurrency) as pool:  # warm-up, not measured
            list(pool.map(one, range(2 * args.concurrency)))
        count0, exec0 = server.inference_counts()["sparsevlm"]
        t0 = time.monotonic()
        with ThreadPoolExecutor(max_workers=args.concurrency) as pool:
            futures = [pool.submit(one, n) for n in range(args.requests)]
            done, pending = wait(futures, timeout=args.timeout)
            for f in pending:
                f.cancel()
        elapsed = time.monotonic() - t0
        results = [f.result() for f in done]
        count1, exec1 = server.inference_counts()["sparsevlm"]
    finally:
        pool_clients.close()
        server.stop()

    report = {
        "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores, no GPU (CPU onnxruntime)",
        "server": "tritonserver 2.51 (nvidia-pytriton 0.7.0), python flavour",
        "settings": {"requests": args.requests, "concurrency": args.concurrency, "instances": args.instances,
                     "max_batch": args.max_batch, "queue_delay_us": args.queue_delay_us,
                     "max_new_tokens": args.max_new_tokens, "protocols": protocols},
        "startup_s": round(server.startup_seconds, 2), "elapsed_s": round(elapsed, 2),
        "completed": len(results), "not_completed": args.requests - len(results),
        "throughput_req_s": round(len(results) / elapsed, 2),
        "failures": sum(1 for r in results if r[2] and r[2] != "mismatch"),
        "mismatches": sum(1 for r in results if r[2] == "mismatch"),
        "in_process_s_per_request": round(in_process, 3),
        "server_inferences": count1 - count0, "server_executions": exec1 - exec0,
        "avg_batch": round((count1 - count0) / max(1, exec1 - exec0), 2),
        "clean_stop": {"leftover_pids": server.leftover_pids, "leftover_shm": server.leftover_shm},
        "protocols": {},
    }
    for protocol in protocols + ["all"]:
        lat = [r[1] for r in results if (protocol == "all" or r[0] == protocol) and not r[2]]
        report["protocols"][protocol] = {"ok": len(lat), "p50_ms": round(percentile(lat, 50) * 1e3, 1),
                                         "p90_ms": round(percentile(lat, 90) * 1e3, 1),
                                         "p99_ms": round(percentile(lat, 99) * 1e3, 1),
                                         "max_ms": round(max(lat) * 1e3, 1) if lat else None}
    errors = sorted({r[2] for r in results if r[2]})
    report["error_kinds"] = errors[:5]
    print(json.dumps(report, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return 0 if report["failures"] == 0 and report["mismatches"] == 0 and not report["not_completed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
