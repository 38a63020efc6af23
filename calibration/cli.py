"""`sparsevlm-calibrate`: record the keep counts of a method over a calibration set and
choose the optimization profiles of each pruned segment.

    sparsevlm-calibrate --model demo --method sparsevlm --variant v1.0 --budget 192 \\
        --synthetic 300 --out calib/
    sparsevlm-calibrate --model llava-1.5-7b --variant v1.0 --budget 128 --data prompts.jsonl --out calib/

An interrupted run keeps every finished batch in OUT/samples.jsonl; the same command
resumes it.
"""

from __future__ import annotations

import argparse
import sys

from sparsevlm.cli import add_verbose_flag, check_method_options, command
from sparsevlm.methods import SparseVLMConfig

from .data import synthetic_samples
from .runner import calibrate
from .store import CalibrationStateError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparsevlm-calibrate", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="local checkpoint directory, hub id, alias, or 'demo'")
    parser.add_argument("--method", default="sparsevlm", help="sparsevlm (default), fastv, fastervlm")
    parser.add_argument("--variant", help="SparseVLM variant: v1.5, v1.0 (rank rule), paper")
    parser.add_argument("--budget", type=int, help="token budget (v1.0: picks the scripts' scale/bias preset)")
    parser.add_argument("--scale", type=float, help="v1.0 rank rule: keep = int(rank*scale + bias)")
    parser.add_argument("--bias", type=float, help="v1.0 rank rule bias")
    parser.add_argument("--lam", type=float, help="paper rule: deleted = int(lam*(v - rank))")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help="JSONL of {\"image\": path, \"prompt\": question}; relative image "
                                       "paths are resolved against the file's directory")
    source.add_argument("--synthetic", type=int, metavar="N", help="use N built-in synthetic samples")
    parser.add_argument("--raw-prompts", action="store_true",
                        help="prompts are complete templated texts containing '<image>' (default: prompts "
                             "are the question and the chat template inserts the image)")
    parser.add_argument("--out", required=True, help="output directory (samples.jsonl, calibration.json, report.png)")
    parser.add_argument("--max-profiles", type=int, default=4, help="profiles per segment at most (default 4)")
    parser.add_argument("--coverage", type=float, default=0.995, help="fraction of samples the profiles must serve")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--overwrite", action="store_true", help="discard samples recorded by an earlier run in --out")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_verbose_flag(parser)
    return parser


def config_from_args(args) -> SparseVLMConfig:
    return SparseVLMConfig(method=args.method, variant=args.variant, budget=args.budget,
                           scale=args.scale, bias=args.bias, lam=args.lam)


# Failures become one line and exit status 2 (sparsevlm.cli); data, config and input errors
# are ValueErrors whose message names the input at fault.
@command("sparsevlm-calibrate", user_errors=(CalibrationStateError,))
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    check_method_options(args.method, args.variant, {"--variant": args.variant, "--budget": args.budget,
                                                     "--scale": args.scale, "--bias": args.bias, "--lam": args.lam})
    try:
        data = synthetic_samples(args.synthetic) if args.synthetic is not None else args.data
        result = calibrate(args.model, config_from_args(args), data, args.out, max_profiles=args.max_profiles,
                           coverage=args.coverage, batch_size=args.batch_size, raw_prompts=args.raw_prompts,
                           dtype=args.dtype, device=args.device, overwrite=args.overwrite,
                           progress=not args.no_progress)
    except KeyboardInterrupt as interrupt:
        interrupt.add_note(f"finished batches are saved in {args.out}/samples.jsonl; "
                           "run the same command again to resume")
        raise
    print(f"wrote {result.calibration_path} and {result.report_path} "
          f"({result.computed} samples run, {result.resumed} resumed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
