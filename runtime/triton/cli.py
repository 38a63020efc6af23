"""`sparsevlm-triton`: write a Triton model repository for an artifact, validate one, serve one.

    sparsevlm-triton [write] --artifact ART --out REPO [--flavour python|tensorrt] [--instances N] [--max-batch B] ...
    sparsevlm-triton validate REPO          (or: --validate REPO)
    sparsevlm-triton serve REPO [--env DIR] [--ports HTTP,GRPC,METRICS | free]

`write` (the default) writes the repository (repository.py) and validates it offline;
`validate` only checks an existing repository (validation.py); `serve` runs the tritonserver
of the nvidia-pytriton wheel on it (server.py) until Ctrl-C. The deployment guide is
README.md in this folder.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
import time
from pathlib import Path

from sparsevlm.cli import add_artifact_argument, add_verbose_flag, command

from . import RepoError
from .repository import DEFAULT_NAME, DEFAULT_PLUGIN_NAME, FLAVOURS, SERVE_COMMAND, write_repository
from .validation import validate_repository

CLIENT_COMMAND = "python -m sparsevlm.runtime.triton.client"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sparsevlm-triton", description="write a Triton Inference Server model "
                                "repository for an artifact (subcommands: write (default) | validate | serve)")
    add_artifact_argument(p, required=False, help="artifact directory (from sparsevlm-export / sparsevlm-build)")
    p.add_argument("--out", help="model repository to write")
    p.add_argument("--flavour", choices=FLAVOURS, default="python")
    p.add_argument("--instances", type=int, default=1, help="instances per model (instance_group count)")
    p.add_argument("--max-batch", type=int, default=8, help="max_batch_size of the generate models (0: no batching)")
    p.add_argument("--queue-delay-us", type=int, default=2000, help="dynamic batching max_queue_delay_microseconds")
    p.add_argument("--name", default=DEFAULT_NAME, help="name of the generate model")
    p.add_argument("--backend", default="auto", choices=["auto", "onnxruntime", "tensorrt", "torch"],
                   help="python flavour: runtime backend (auto: tensorrt with a GPU and engines, else onnxruntime)")
    p.add_argument("--kind", default=None, choices=["KIND_CPU", "KIND_GPU"], help="python flavour instance kind")
    p.add_argument("--no-stream", action="store_true", help="python flavour: no decoupled _stream model")
    p.add_argument("--copy-artifact", action="store_true", help="copy the artifact into the repository")
    p.add_argument("--graph-backend", choices=["tensorrt", "onnxruntime"], default="tensorrt",
                   help="tensorrt flavour: tensorrt_plan graph models, or Python/onnxruntime ones (CPU server)")
    p.add_argument("--plugin-library", help=f"tensorrt flavour: {DEFAULT_PLUGIN_NAME} (for --backend-config)")
    p.add_argument("--site-dirs", default=None,
                   help=f"'{os.pathsep}'-separated dirs the models add to sys.path to import sparsevlm "
                        "(default: this interpreter's site-packages; '' when the stub env has sparsevlm)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--validate", metavar="REPO", help="only validate an existing repository offline")
    add_verbose_flag(p)
    return p


@command("sparsevlm-triton")  # failures: one line, exit 2 (sparsevlm.cli)
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:
        return serve(argv[1:])
    if argv[:1] == ["validate"]:
        p = argparse.ArgumentParser(prog="sparsevlm-triton validate", description="validate a repository offline")
        p.add_argument("repo")
        add_verbose_flag(p)
        return validate(p.parse_args(argv[1:]).repo, "validate")
    if argv[:1] == ["write"]:
        argv = argv[1:]
    args = _parser().parse_args(argv)
    if args.validate:
        return validate(args.validate, "--validate")
    if not args.artifact or not args.out:
        _parser().error("--artifact and --out are required")
    return write(args)


def validate(repo: str, option: str) -> int:
    """Print each problem of `repo` (given as `option`) and a summary; 1 when there are problems."""
    target = Path(repo)
    if not target.is_dir():  # one line from the command wrapper, not a problem report
        state = "is not a directory" if target.exists() else "does not exist"
        raise RepoError(f"{option}: {target} {state} (expected a model repository written by sparsevlm-triton)")
    problems = validate_repository(target)
    for line in problems:
        print(f"error: {line}", file=sys.stderr)
    print("valid" if not problems else f"{len(problems)} problem(s)")
    return 1 if problems else 0


def write(args: argparse.Namespace) -> int:
    site_dirs = None if args.site_dirs is None else args.site_dirs.split(os.pathsep)
    # A bad artifact or output location raises here: one line, exit 2 (the command wrapper).
    info = write_repository(args.artifact, args.out, flavour=args.flavour, instances=args.instances,
                            max_batch=args.max_batch, name=args.name, backend=args.backend,
                            copy_artifact=args.copy_artifact, queue_delay_us=args.queue_delay_us,
                            site_dirs=site_dirs, streaming=not args.no_stream, kind=args.kind,
                            plugin_library=args.plugin_library, graph_backend=args.graph_backend,
                            overwrite=args.overwrite)
    problems = validate_repository(info.path)
    for line in problems:
        print(f"error: {line}", file=sys.stderr)
    print(f"wrote {info.flavour} repository {info.path}: models {', '.join(info.models)}")
    for note in info.notes:
        print(f"note: {note}")
    print("start the server with:")
    print(f"  {shlex.join(info.start_command)}        # a full tritonserver (NGC container)")
    if info.cpu_servable:
        print(f"  {SERVE_COMMAND} {info.path}        # the nvidia-pytriton server (CPU)")
    print(f"then: {CLIENT_COMMAND} --url 127.0.0.1:8000 --image IMG --prompt 'What is in the image?'")
    return 1 if problems else 0


def serve(argv: list[str]) -> int:
    """Run the nvidia-pytriton tritonserver on a repository until Ctrl-C or SIGTERM."""
    from .server import LocalTritonServer

    p = argparse.ArgumentParser(prog="sparsevlm-triton serve",
                                description="run the nvidia-pytriton tritonserver on a repository (Ctrl-C stops it)")
    p.add_argument("repo")
    p.add_argument("--env", default=None, help="venv with nvidia-pytriton and numpy<2 (default $SPARSEVLM_TRITON_ENV)")
    p.add_argument("--ready-timeout", type=float, default=180)
    p.add_argument("--ports", default="8000,8001,8002", help="HTTP,gRPC,metrics ports on 127.0.0.1 ('free': pick free ones)")
    add_verbose_flag(p)
    args = p.parse_args(argv)
    ports = None if args.ports == "free" else tuple(int(x) for x in args.ports.split(","))
    if ports is not None and len(ports) != 3:
        p.error("--ports: expected HTTP,gRPC,metrics")
    server = LocalTritonServer(args.repo, env=args.env, ready_timeout=args.ready_timeout, ports=ports)

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)  # `kill PID` stops the server (and its stubs) cleanly too
    server.start()
    print(f"ready in {server.startup_seconds:.1f} s: HTTP {server.http_url}  gRPC {server.grpc_url}  "
          f"metrics 127.0.0.1:{server.metrics_port}  log {server.log_path}", flush=True)
    try:
        while server.alive():
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    print(f"stopped; leftover processes {server.leftover_pids or 'none'}, /dev/shm regions "
          f"{server.leftover_shm or 'none'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
