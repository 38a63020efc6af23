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

from sparsevlm.cli import (add_method_arguments, add_quiet_flag, add_verbose_flag, command, method_budgets_from_args,
                           method_options_from_args)
from sparsevlm.methods import SparseVLMConfig

from .data import synthetic_samples
from .runner import calibrate
from .store import CalibrationStateError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparsevlm-calibrate", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="local checkpoint directory, hub id, alias, or 'demo'")
    add_method_arguments(parser)
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
    add_quiet_flag(parser)
    parser.add_argument("--no-progress", dest="quiet", action="store_true", help=argparse.SUPPRESS)  # the old spelling
    add_verbose_flag(parser)
    return parser


def config_from_args(args) -> SparseVLMConfig:
    """The method of parsed `args`, as sparsevlm-export builds it for the same flags (OptionError
    for an option the method does not use)."""
    options = method_options_from_args(args)
    [budget] = method_budgets_from_args(args)
    return SparseVLMConfig(budget=budget, **options)


# Failures become one line and exit status 2 (sparsevlm.cli); data, config and input errors
# are ValueErrors whose message names the input at fault.
@command("sparsevlm-calibrate", user_errors=(CalibrationStateError,))
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    config = config_from_args(args)
    try:
        data = synthetic_samples(args.synthetic) if args.synthetic is not None else args.data
        result = calibrate(args.model, config, data, args.out, max_profiles=args.max_profiles,
                           coverage=args.coverage, batch_size=args.batch_size, raw_prompts=args.raw_prompts,
                           dtype=args.dtype, device=args.device, overwrite=args.overwrite,
                           progress=not args.quiet)
    except KeyboardInterrupt as interrupt:
        interrupt.add_note(f"finished batches are saved in {args.out}/samples.jsonl; "
                           "run the same command again to resume")
        raise
    print(f"wrote {result.calibration_path} and {result.report_path} "
          f"({result.computed} samples run, {result.resumed} resumed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
