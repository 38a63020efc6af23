"""benchmarks/gpu_check.sh in its --dry-run mode, the CPU-only rehearsal of the GPU check.

The dry run compiles everything the GPU run compiles (the plugin library with CMake, the kernel
program trt_plugins/tests/gpu_check.cu, the enqueue program trt_plugins/tests/gpu_enqueue.cu),
runs the CPU path of every op at the LLaVA-1.5-7B shapes (B = 1 and 8, 576 visual tokens,
hidden size 4096, float32 and float16) and checks it by brute force, drives every plugin up
to onShapeChange at those shapes, and prints the table the GPU run fills with times. The GPU
run itself needs a CUDA device and is not run here.

Needs nvcc; the enqueue rows need the TensorRT headers and CMake as well (see
tests/test_trt_plugin_library.py), and reuse that module's CMake build of the library.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from test_trt_plugin_library import _nvcc, _tensorrt_include, built  # noqa: F401 - shared build fixture

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"
OPS = ["TopKTokenSelect", "TokenPrune", "TokenRecycle", "RankKeepCount"]
EXPECTED_ROWS = {(op, dtype, batch) for op in OPS for dtype in ("float32", "float16") for batch in (1, 8)}
ROW = re.compile(r"^(kernel|enqueue)\s+(\w+)\s+(float32|float16)\s+(\d+)\s+(.+?)\s+([\d.]+)\s+(\S+)\s+(\S+)\s+"
                 r"n/a \(dry run\)\s+n/a \(dry run\)\s+n/a \(dry run\)$")


def _rows(stdout: str, path: str) -> dict[tuple[str, str, int], tuple[str, float, str, str]]:
    """(op, type, B) -> (shape column, MB moved, CPU ms column, GFLOP column) of one program's table."""
    rows = {}
    for line in stdout.splitlines():
        match = ROW.match(line)
        if match and match.group(1) == path:
            key = (match.group(2), match.group(3), int(match.group(4)))
            assert key not in rows, f"row printed twice: {line}"
            rows[key] = (match.group(5), float(match.group(6)), match.group(8), match.group(7))
    return rows


@pytest.fixture(scope="module")
def dry_run(request, tmp_path_factory) -> tuple[subprocess.CompletedProcess, bool]:
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (PATH or /usr/local/cuda/bin/nvcc): the dry run compiles the CUDA programs")
    env = dict(os.environ, NVCC=nvcc)
    include = _tensorrt_include()
    with_library = include is not None and shutil.which("cmake") is not None
    if with_library:
        # The library tests' CMake build (sm_80, these headers): the script's configure is a no-op.
        build_dir = request.getfixturevalue("built")
        env["TENSORRT_INCLUDE"] = str(include.resolve())
    else:
        build_dir = tmp_path_factory.mktemp("gpu_check_build")
        for name in ("TENSORRT_INCLUDE", "TensorRT_INCLUDE_DIR", "TENSORRT_ROOT"):
            env.pop(name, None)
    result = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--build-dir", str(build_dir), "--arch", "80"],
                            capture_output=True, text=True, env=env, timeout=1200)
    return result, with_library


def test_dry_run_completes_with_every_op_and_shape(dry_run):
    result, with_library = dry_run
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "every check passed (dry run: no device code ran)" in result.stdout
    assert "FAIL" not in result.stdout

    kernel = _rows(result.stdout, "kernel")
    assert set(kernel) == EXPECTED_ROWS
    for (op, _, _), (shape, _, cpu_ms, _) in kernel.items():
        assert "576" in shape and ("D=4096" in shape or op == "RankKeepCount"), (op, shape)
        float(cpu_ms)  # the CPU path ran at these shapes (a number, not n/a)
    # One check per case: the CPU path against a brute-force computation (stable sorts, a
    # constructed rank), at the full shapes.
    assert "gpu_check: 16 checks, 0 failed" in result.stdout

    if with_library:
        enqueue = _rows(result.stdout, "enqueue")
        assert set(enqueue) == EXPECTED_ROWS
        # createPlugin twice, configurePlugin, getWorkspaceSize, attachToContext, onShapeChange
        # and the creator lookup per case, all passed.
        summary = re.search(r"gpu_enqueue: (\d+) checks, (\d+) failed", result.stdout)
        assert summary and summary.group(2) == "0" and int(summary.group(1)) == 7 * len(EXPECTED_ROWS)
        assert {key: value[:2] for key, value in enqueue.items()} == {key: value[:2] for key, value in kernel.items()}
    else:
        assert "TensorRT headers (NvInfer.h) not found" in result.stdout


def test_dry_run_states_the_byte_counts(dry_run):
    result, _ = dry_run
    for op in OPS:
        assert re.search(rf"^\s+{op}\s+B\*", result.stdout, re.MULTILINE), f"no byte-count formula for {op}"
    kernel = _rows(result.stdout, "kernel")
    # Hand-computed from the stated formulas.
    # TopKTokenSelect float32 B=1: N*4 + 2*k*D*4 + 8*k = 2304 + 6291456 + 1536 bytes.
    assert kernel[("TopKTokenSelect", "float32", 1)][1] == pytest.approx(6.295296, abs=0.005)
    # RankKeepCount float16 B=8: 8*64*576*2 + 4*8*(64+576) + 16*8 = 589824 + 20480 + 128 bytes.
    assert kernel[("RankKeepCount", "float16", 8)][1] == pytest.approx(0.610432, abs=0.005)
    # float16 moves half the float32 bytes of the D-wide rows.
    assert kernel[("TopKTokenSelect", "float16", 8)][1] < 0.51 * kernel[("TopKTokenSelect", "float32", 8)][1]


def test_dry_run_states_the_flop_counts(dry_run):
    result, with_library = dry_run
    for op in OPS:
        assert re.search(rf"^\s+{op}\s+(none|sum over rows|per Jacobi pair)", result.stdout, re.MULTILINE), \
            f"no FLOP formula for {op}"
    assert "2*P*P*D" in result.stdout
    kernel = _rows(result.stdout, "kernel")
    for dtype in ("float32", "float16"):
        assert kernel[("TopKTokenSelect", dtype, 1)][3] == kernel[("TokenPrune", dtype, 8)][3] == "-"
        # TokenRecycle B=1: keep_count 300 of ~98 % of 576 valid tokens leaves d in [250, 276]
        # deleted, so P = 30 * d // 100 + 1 in [76, 83] candidates; 2*P*P*D + P*D with D = 4096.
        low, high = (2 * p * p * 4096 + p * 4096 for p in (76, 83))
        assert low / 1e9 <= float(kernel[("TokenRecycle", dtype, 1)][3]) <= high / 1e9
        # The SVD's count comes from the CPU path's sweeps: at least one sweep of visited pairs
        # over 64 vectors of >= 500 elements (6 * 500 * 64 * 63 / 2 FLOPs).
        assert float(kernel[("RankKeepCount", dtype, 1)][3]) >= 6 * 500 * 64 * 63 / 2 / 1e9
    if with_library:
        enqueue = _rows(result.stdout, "enqueue")
        # The enqueue dry run does not run the CPU path: the data-independent counts only.
        assert enqueue[("TokenRecycle", "float32", 8)][3] == kernel[("TokenRecycle", "float32", 8)][3]
        assert enqueue[("RankKeepCount", "float32", 8)][3] == "n/a"


@pytest.mark.parametrize("arguments, message", [
    (["--runs", "0"], "gpu_check.sh: --runs expects a positive integer, got '0'"),
    (["--arch"], "gpu_check.sh: --arch expects a value (usage: "),
    (["--gpu"], "gpu_check.sh: unknown argument '--gpu' (usage: "),
])
def test_bad_option_is_one_clear_line(arguments, message):
    result = subprocess.run(["bash", str(SCRIPT), *arguments], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith(message), result.stderr
    assert result.stdout == ""
