"""benchmarks/bench_speed.py --quick: the speed benchmark runs end to end on a tiny model and
prints its table (no timing is asserted: only that every figure is there and consistent)."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_speed.py"
COLUMNS = ["backend", "setting", "LLM prefill ms", "time ratio", "FLOPs ratio", "efficiency", "efficiency (fastest runs)",
           "with vision ms", "time ratio (vision)", "vs transformers"]
SETTINGS = ["unpruned", "SparseVLM v1.5 64", "FasterVLM 95%"]


LINEAR_COLUMNS = ["backend", "setting", "linear ms", "tokens ratio", "time ratio", "linear efficiency"]


@pytest.fixture(scope="module")
def stdout(tmp_path_factory) -> list[str]:
    work = tmp_path_factory.mktemp("bench-speed")
    result = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--work", str(work)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.splitlines()


def parse_table(stdout: list[str], first: int, columns: list[str]) -> list[dict]:
    """The markdown table starting at line `first`, its cells as numbers where they are."""
    end = stdout.index("", first) if "" in stdout[first:] else len(stdout)
    lines = stdout[first:end]
    assert [cell.strip() for cell in lines[0].strip("|").split("|")] == columns
    assert set(lines[1].replace("|", "")) == {"-"}
    rows = []
    for line in lines[2:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        assert len(cells) == len(columns), line
        rows.append({column: (cell if column in ("backend", "setting") else float(cell) if cell else None)
                     for column, cell in zip(columns, cells)})
    return rows


@pytest.fixture(scope="module")
def table(stdout) -> list[dict]:
    # The first table (elapsed time); the CPU-time table follows it after a blank line.
    assert sum(line.startswith("| backend | setting | LLM prefill ms |") for line in stdout) == 2  # both clocks' tables
    return parse_table(stdout, next(i for i, line in enumerate(stdout) if line.startswith("|")), COLUMNS)


def test_linear_layers_table(stdout, table):
    """The GEMM-only bound: each setting's linear layers at its layer token counts; the tokens
    ratio is the accounting's (the same counts the FLOPs ratio comes from), the efficiency the
    printed ratio of ratios."""
    title = next(i for i, line in enumerate(stdout) if line.startswith("linear layers alone"))
    rows = by_key(parse_table(stdout, title + 2, LINEAR_COLUMNS))
    assert list(rows) == [(backend, setting) for backend in ("onnxruntime", "torch") for setting in SETTINGS]
    flops = by_key(table)
    for backend in ("onnxruntime", "torch"):
        assert rows[backend, "unpruned"]["tokens ratio"] == rows[backend, "unpruned"]["time ratio"] == 1.0
        for setting in SETTINGS[1:]:
            row = rows[backend, setting]
            assert 0 < row["tokens ratio"] < 1 and row["linear ms"] > 0
            assert row["tokens ratio"] == rows["torch", setting]["tokens ratio"]  # the same run's counts
            assert math.isclose(row["linear efficiency"], row["tokens ratio"] / row["time ratio"], rel_tol=0.01)
            # the linear layers' FLOPs fall with the tokens, the attention's faster: tokens >= FLOPs ratio
            assert row["tokens ratio"] >= flops[backend, setting]["FLOPs ratio"]
        assert rows[backend, "FasterVLM 95%"]["tokens ratio"] < rows[backend, "SparseVLM v1.5 64"]["tokens ratio"]


def by_key(rows):
    return {(row["backend"], row["setting"]): row for row in rows}


def test_every_backend_and_setting_has_its_figures(table):
    rows = by_key(table)
    for backend in ("onnxruntime", "torch"):
        for setting in SETTINGS:
            row = rows[backend, setting]
            assert all(row[column] is not None and row[column] > 0 for column in COLUMNS[2:]), row
    for setting in ("LLM forward", "forward with vision", "generate, 1 token"):
        assert ("transformers", setting) in rows


def test_ratios_follow_from_the_printed_figures(table):
    rows = by_key(table)
    for backend in ("onnxruntime", "torch"):
        base = rows[backend, "unpruned"]
        assert base["time ratio"] == base["FLOPs ratio"] == base["efficiency"] == 1.0
        for setting in SETTINGS[1:]:
            row = rows[backend, setting]
            # Printed to 4 significant digits (0.1 above 10): compare with that tolerance.
            assert math.isclose(row["time ratio"], row["LLM prefill ms"] / base["LLM prefill ms"], rel_tol=0.01)
            assert math.isclose(row["efficiency"], row["FLOPs ratio"] / row["time ratio"], rel_tol=0.01)
            assert row["with vision ms"] > row["LLM prefill ms"]


def test_flops_ratio_is_the_same_pruning_on_both_backends(table):
    """Both backends run the same plan on the same prompt, so they prune the same tokens and
    the accounting's FLOPs ratio (not a timing) must agree; pruning lowers it below 1."""
    rows = by_key(table)
    for setting in SETTINGS[1:]:
        assert rows["onnxruntime", setting]["FLOPs ratio"] == rows["torch", setting]["FLOPs ratio"] < 1.0
    assert rows["onnxruntime", "FasterVLM 95%"]["FLOPs ratio"] < rows["onnxruntime", "SparseVLM v1.5 64"]["FLOPs ratio"]
