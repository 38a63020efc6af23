"""`sparsevlm-run`: answer a prompt about an image with an exported artifact."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from sparsevlm.cli import add_artifact_argument, add_verbose_flag, check_output_file, command
from sparsevlm.methods.files import atomic_file
from sparsevlm.methods.generation import validate_trace
from sparsevlm.methods.loading import check_device

from .backends import BACKENDS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sparsevlm-run", description=(
        "Run an artifact written by sparsevlm-export on one image and prompt: prints the answer, the visual "
        "tokens kept per pruning layer, and prefill/decode times."))
    add_artifact_argument(p)
    p.add_argument("--image", required=True, help="image file (any format PIL reads)")
    p.add_argument("--prompt", required=True, help="the question; the chat template adds the image placeholder")
    p.add_argument("--backend", default="onnxruntime", choices=BACKENDS, help="default: onnxruntime")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None, help="sampling seed")
    p.add_argument("--trace-json", help="write the sparsevlm-trace/1 JSON of this run to FILE")
    p.add_argument("--model", help="torch backend: checkpoint to use instead of the one the manifest names")
    p.add_argument("--plugin-library", help="tensorrt backend: path of libsparsevlm_plugins.so")
    p.add_argument("--device", default="cpu", help="torch backend device (cpu, cuda)")
    p.add_argument("--debug", action="store_true", help="log the profile chosen for each segment (--verbose does too)")
    add_verbose_flag(p)
    return p



# Failures become one line and exit status 2 (sparsevlm.cli).
@command("sparsevlm-run")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug or args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    check_device(args.device)
    trace_path = check_output_file(args.trace_json, "--trace-json") if args.trace_json else None  # before the run
    from .pipeline import Pipeline
    pipe = Pipeline.load(args.artifact, args.backend, model=args.model, plugin_library=args.plugin_library,
                         device=args.device)
    out = pipe.generate([args.image], [args.prompt], max_new_tokens=args.max_new_tokens,
                        temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    trace = out.trace
    print(f"answer: {out.texts[0]!r}")
    print(f"method: {json.dumps(trace['method'])}")
    for layer in trace["layers"]:
        rank = f", rank {layer['rank'][0]}" if layer["rank"][0] is not None else ""
        print(f"  layer {layer['layer']:>3}: kept {layer['keep_count'][0]} visual tokens"
              f" + {layer['recycled'][0]} recycled{rank}")
    for choice in out.profiles:
        print(f"  segment {choice['segment']}: width {choice['width']} -> profile {choice['profile']} "
              f"{choice['min_opt_max']}")
    row = out.accounting["rows"][0]
    print(f"tokens: equal-tokens {row['equal_tokens']:.1f}, mean layer-input {row['mean_layer_input_tokens']:.1f}; "
          f"FLOPs ratio vs unpruned {row['flops_ratio']:.3f}")
    t = out.timings
    steps = max(t["decode_steps"] - 1, 1)
    print(f"time: vision {t['vision'] * 1e3:.1f} ms, prefill {t['prefill'] * 1e3:.1f} ms, "
          f"decode {t['decode'] * 1e3 / steps:.1f} ms/token ({args.backend})")
    if trace_path is not None:
        validate_trace(trace)
        atomic_file(trace_path, json.dumps(trace))  # whole or not at all
        print(f"trace written to {trace_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
