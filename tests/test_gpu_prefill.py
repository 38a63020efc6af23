"""benchmarks/gpu_prefill.py in its --dry-run mode, the CPU rehearsal of the GPU prefill benchmark.

The dry run is the GPU run's code (model built in place from a configuration, the method path
`generation.prefill` on the TorchExecutor, plain transformers' forward, the accounting, the
table) on a tiny random LLaVA on the CPU. It runs here as the GPU machine runs it: as a
script, from a directory outside the checkout, with no PYTHONPATH, so `sparsevlm` is
imported through the script's own mapping of pyproject.toml's package-dir. Times are not
checked (no timing asserts); the table's rows, token counts and FLOPs ratios are, against
hand-computed values. The GPU run itself needs a CUDA device and is not run here.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

import sparsevlm.methods  # noqa: F401 - imported first, so loading the script (`script`) adds no import mapping

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_prefill.py"
SETTINGS = ["unpruned", "SparseVLM v1.5 192", "SparseVLM v1.5 128", "SparseVLM v1.5 64", "FasterVLM 75%",
            "FasterVLM 90%", "FasterVLM 95%", "FastV K=2 R=0.75", "FastV K=2 192", "transformers (SDPA)"]

# The dry run's tiny model (demo_config: 22 decoder layers, hidden 64, MLP 128) and prompt
# (BOS + 34 words, 576 image tokens, 83 words: 118 text tokens).
LAYERS, HIDDEN, MLP, TEXT_TOKENS, VISUAL = 22, 64, 128, 118, 576


def _layer_macs(n: int) -> int:
    """One decoder layer with n tokens, as the paper counts (docs/accounting.md)."""
    return 4 * n * HIDDEN ** 2 + 2 * n * n * HIDDEN + 3 * n * HIDDEN * MLP


def _expected(counts: list[tuple[int, int]]) -> tuple[float, float]:
    """(mean visual tokens at a layer input, FLOPs ratio) for [(layers, visual tokens), ...]."""
    assert sum(layers for layers, _ in counts) == LAYERS
    macs = sum(layers * _layer_macs(TEXT_TOKENS + visual) for layers, visual in counts)
    mean = sum(layers * visual for layers, visual in counts) / LAYERS
    return mean, macs / (LAYERS * _layer_macs(TEXT_TOKENS + VISUAL))


# Visual tokens entering each layer. SparseVLM v1.5 keeps 300/200/110 (192), 303/110/36 (128),
# 66/30/17 (64) at layers 2/6/15 plus the recycled tokens (int(0.3 d) + 1 candidates ->
# int(candidates / 10) + 1 merged, d deleted), so layers 0-2 see 576, 3-6 the first count,
# 7-15 the second, 16-21 the third. FasterVLM keeps round(576 (1 - r)) before the LLM; FastV
# K=2 keeps round(576 (1 - R)) (or the budget) after layer 1.
EXPECTED = {
    "unpruned": _expected([(22, 576)]),
    "SparseVLM v1.5 192": _expected([(3, 576), (4, 300 + 9), (9, 200 + 4), (6, 110 + 3)]),
    "SparseVLM v1.5 128": _expected([(3, 576), (4, 303 + 9), (9, 110 + 7), (6, 36 + 3)]),
    "SparseVLM v1.5 64": _expected([(3, 576), (4, 66 + 16), (9, 30 + 2), (6, 17 + 1)]),
    "FasterVLM 75%": _expected([(22, 144)]),
    "FasterVLM 90%": _expected([(22, 58)]),
    "FasterVLM 95%": _expected([(22, 29)]),
    "FastV K=2 R=0.75": _expected([(2, 576), (20, 144)]),
    "FastV K=2 192": _expected([(2, 576), (20, 192)]),
    "transformers (SDPA)": _expected([(22, 576)]),
}
PAPER_SPEEDUPS = {"SparseVLM v1.5 192": 1.58, "SparseVLM v1.5 128": 1.74, "SparseVLM v1.5 64": 1.93}


def _without_pythonpath() -> dict:
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """One dry run in float16 (the GPU run's type), 1 warm-up + 1 timed call per setting."""
    out = tmp_path_factory.mktemp("gpu_prefill")
    result = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--dtype", "float16", "--warmup", "1",
                             "--runs", "1", "--out", str(out / "report.txt"), "--json", str(out / "rows.json")],
                            capture_output=True, text=True, cwd=out, env=_without_pythonpath(), timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result, (out / "report.txt").read_text(), json.loads((out / "rows.json").read_text())


def test_every_setting_has_one_row_with_its_tokens_and_flops(dry_run):
    _, _, report = dry_run
    rows = {row["setting"]: row for row in report["rows"]}
    assert [row["setting"] for row in report["rows"]] == SETTINGS
    assert report["dry_run"] and report["dtype"] == "float16" and report["prompt_tokens"] == TEXT_TOKENS + VISUAL
    for name, (mean_visual, flops_ratio) in EXPECTED.items():
        row = rows[name]
        assert row["mean_visual_tokens"] == pytest.approx(mean_visual, abs=1e-9), name
        assert row["flops_ratio"] == pytest.approx(flops_ratio, rel=1e-12), name
        assert row["logits_finite"], name
    for name in SETTINGS[1:-1]:
        assert rows[name]["flops_ratio"] < 1.0, name
    assert rows["unpruned"]["tflops"] == pytest.approx(LAYERS * _layer_macs(TEXT_TOKENS + VISUAL) / 1e12)


def test_speedups_are_ratios_to_the_unpruned_row(dry_run):
    _, _, report = dry_run
    rows = {row["setting"]: row for row in report["rows"]}
    base = rows["unpruned"]
    assert base["speedup"] == 1.0 and base["llm_speedup"] == 1.0 and base["efficiency_llm"] == pytest.approx(1.0)
    hf = rows["transformers (SDPA)"]
    for name, row in rows.items():
        for key in ("ms", "min_ms", "llm_ms", "vision_ms"):
            assert math.isfinite(row[key]) and row[key] > 0, (name, key, row[key])
        assert row["min_ms"] <= row["ms"] and row["llm_ms"] < row["ms"], name
        assert row["speedup"] == pytest.approx(base["ms"] / row["ms"]), name
        assert row["llm_speedup"] == pytest.approx(base["llm_ms"] / row["llm_ms"]), name
        assert row["vs_transformers"] == pytest.approx(hf["ms"] / row["ms"]), name
        if row["efficiency_llm"] is not None:  # FLOPs ratio / time ratio
            assert row["efficiency_llm"] == pytest.approx(row["flops_ratio"] / (row["llm_ms"] / base["llm_ms"])), name
    assert hf["efficiency_llm"] is None and hf["efficiency_with_vision"] is None
    for name, speedup in PAPER_SPEEDUPS.items():
        assert round(rows[name]["paper_speedup"], 2) == speedup, name
    assert {name for name, row in rows.items() if row["paper_speedup"] is not None} == \
        {"unpruned", "FastV K=2 192", *PAPER_SPEEDUPS}


def test_printed_table_has_every_row_and_the_paper_column(dry_run):
    result, written, report = dry_run
    assert result.stdout.strip() == written.strip()  # --out holds what was printed
    lines = result.stdout.splitlines()
    header = next(line for line in lines if line.startswith("setting "))
    assert all(title in header for title in ("speedup", "paper", "FLOPs", "LLM ms", "eff LLM", "vs HF"))
    table = {line[:19].strip(): line.split() for line in lines[lines.index(header) + 2:] if line[:19].strip() in SETTINGS}
    assert list(table) == SETTINGS
    for row in report["rows"]:
        cells = table[row["setting"]][len(row["setting"].split()):]
        assert float(cells[2]) == pytest.approx(row["flops_ratio"], abs=5e-4)  # the FLOPs column
        expected_paper = "-" if row["paper_speedup"] is None else f"{row['paper_speedup']:.2f}x"
        assert cells[5] == expected_paper
    assert "sparsevlm from " + str(REPO) in result.stdout  # the checkout next to the script, not an install


@pytest.fixture
def script(monkeypatch):
    """The script loaded as a module (sparsevlm is already imported: it adds no import mapping)."""
    spec = importlib.util.spec_from_file_location("gpu_prefill", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_prefill", module)  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_source_tree_mapping_is_pyprojects(script):
    """The script's import mapping is pyproject.toml's package-dir (read independently with tomllib)."""
    expected = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    assert script.package_dirs(REPO / "pyproject.toml") == expected


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a CUDA device")
def test_without_a_gpu_the_full_run_is_refused_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, str(SCRIPT), "--runs", "1"], capture_output=True, text=True,
                            cwd=tmp_path, env=_without_pythonpath(), timeout=300)
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stderr.startswith("gpu_prefill.py: error: no CUDA device") and "--dry-run" in result.stderr
    assert result.stdout == ""


def test_a_cuda_device_gets_its_index(script, monkeypatch):
    """torch.cuda.set_device(torch.device('cuda')) raises (no index): the script names the current device."""
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert script.with_index("cuda") == "cuda:3"
    assert script.with_index("cuda:1") == "cuda:1"
    with pytest.raises(ValueError, match="specified index"):  # why: what torch does with the bare name
        torch.cuda.set_device(torch.device("cuda"))
