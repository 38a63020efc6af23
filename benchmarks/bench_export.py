"""Export benchmark: wall time and peak resident memory of `sparsevlm-export`.

    .venv/bin/python benchmarks/bench_export.py              # tiny (demo) and mid-size
    .venv/bin/python benchmarks/bench_export.py --full-7b    # + llava-1.5-7b --random-weights --dtype float16

Each export runs as its own `sparsevlm-export` process; peak RSS is that process's
(ru_maxrss of the waited child). The 7B run needs the LLaVA-1.5-7B config.json: offline,
point --model-7b at a local directory holding it (no weights needed with --random-weights).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sparsevlm.methods.demo_model import build_demo_model

EXPORT = [sys.executable, "-c", "import sys; from sparsevlm.export.exporter import main; sys.exit(main())"]


def run_export(args: list[str]) -> tuple[float, float, int]:
    """(seconds, peak RSS GB, exit code) of one export process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(EXPORT + args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    if status:
        print(proc.stderr.read()[-2000:], file=sys.stderr)
    return seconds, usage.ru_maxrss / 1e6, os.waitstatus_to_exitcode(status)


def dir_size(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--full-7b", action="store_true")
    p.add_argument("--model-7b", default="llava-1.5-7b", help="alias, hub id or local dir with the 7B config")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-export-"))
    cases = [("tiny (demo, 22 layers, hidden 64)", str(build_demo_model(work / "tiny")), []),
             ("mid (18 layers, hidden 1024)", str(build_demo_model(work / "mid", num_layers=18, hidden_size=1024)), [])]
    if args.full_7b:
        cases.append(("llava-1.5-7b random weights fp16", args.model_7b, ["--random-weights", "--dtype", "float16"]))
    print(f"{'model':<36} {'budget':>7} {'seconds':>8} {'peak RSS GB':>12} {'artifact GB':>12} {'exit':>5}")
    for label, model, extra in cases:
        out = work / "out"
        seconds, rss, code = run_export(["--model", model, "--out", str(out), "--budget", "192", "--quiet",
                                         "--overwrite", *extra])
        size = dir_size(out) if out.exists() else 0.0
        print(f"{label:<36} {192:>7} {seconds:>8.1f} {rss:>12.2f} {size:>12.3f} {code:>5}")
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
