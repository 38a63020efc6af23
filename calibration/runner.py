"""Run the PyTorch method over a calibration set and turn what each pruning layer decided
into optimization profiles (`calibration.json`), a plot and a summary.

Per sample we record, for every pruning layer, the visual tokens entering it, the rank (rank
rules), the keep count and the recycled tokens, and for every prefill segment its visual
width and sequence length (text included). Batch rows behave like independent batch-1 runs,
so the per-row entries of a batched prefill are per-sample statistics, and the width of
segment i >= 1 for a sample is keep + recycled at the pruning layer that closes segment i-1
(the batch-1 value of the runtime's W = max over rows).
"""

from __future__ import annotations

import hashlib
import json
import re
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from tqdm.auto import tqdm

from sparsevlm.methods import SparseLlava, SparseVLMConfig
from sparsevlm.methods.generation import InputError, build_batch, prefill
from sparsevlm.methods.inputs import image_layout
from sparsevlm.methods.files import atomic_file
from sparsevlm.methods.loading import config_sha256

from .buckets import choose_buckets
from .data import CalibrationDataError, CalibrationSample, load_jsonl
from .store import CALIBRATION_SCHEMA, SampleStore, run_key

CALIBRATION_FILE = "calibration.json"
REPORT_FILE = "report.png"


@dataclass
class CalibrationResult:
    out_dir: Path
    calibration: dict  # the calibration.json content
    records: list[dict]  # per sample, in index order
    computed: int  # samples run by this call
    resumed: int  # samples taken from an earlier run's samples.jsonl
    report_panels: int  # panels in report.png (one per pruning layer)

    @property
    def calibration_path(self) -> Path:
        return self.out_dir / CALIBRATION_FILE

    @property
    def report_path(self) -> Path:
        return self.out_dir / REPORT_FILE


# --------------------------------------------------------------------------------------
# Model and run identity
# --------------------------------------------------------------------------------------

def load_model(model, config: SparseVLMConfig | None, dtype: str = "float32", device: str = "cpu") -> SparseLlava:
    """A SparseLlava for `model` (a name for `sparsevlm.methods.loading`, or a SparseLlava,
    re-wrapped when `config` asks for another method)."""
    if isinstance(model, SparseLlava):
        if config is None or config == model.config:
            return model
        return SparseLlava(model.model, config, model.processor)
    if config is None:
        raise ValueError("config: expected a SparseVLMConfig naming the method to calibrate")
    return SparseLlava.from_pretrained(str(model), config, dtype=dtype, device=device)


SMALL_FILE = 64 << 20  # weight files below this are hashed; larger ones are named by size


def _file_fingerprint(path: Path) -> str:
    if path.stat().st_size < SMALL_FILE:
        return hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    return f"size:{path.stat().st_size}"


def _checkpoint_fingerprint(location: str) -> dict | None:
    """Config and weight files of a local checkpoint (None for a hub id: its name is all we
    have without downloading). Large shards go by size: hashing 14 GB per run costs minutes."""
    root = Path(location)
    if not root.is_dir():
        return None
    files = [root / "config.json", *sorted(root.glob("*.safetensors"))]
    return {f.name: _file_fingerprint(f) for f in files if f.is_file()}


def run_identity(vlm: SparseLlava, raw_prompts: bool) -> dict:
    """What determines the records: the checkpoint, the method, the dtype and prompt mode."""
    location = str(vlm.model.name_or_path)
    return {"model": location, "files": _checkpoint_fingerprint(location), "method": vlm.plan.config.to_dict(),
            "dtype": str(vlm.model.dtype), "raw_prompts": raw_prompts}


# --------------------------------------------------------------------------------------
# Running batches
# --------------------------------------------------------------------------------------

def _segment_decisions(decisions, plan) -> list:
    """The decision that closes each segment 0..n-2 (FasterVLM's pre-LLM entry closes none)."""
    by_layer = {d.layer: d for d in decisions}
    return [by_layer[layer] for layer in plan.prune_layers]


def records_from_prefill(result, plan, samples: Sequence[CalibrationSample],
                         visual_counts: Sequence[int] | None = None) -> list[dict]:
    """One record per batch row: per pruning layer and per segment, that row's entries
    (`visual_counts`: each row's image's visual count, anyres; default the plan's num_visual)."""
    closing = _segment_decisions(result.decisions, plan)
    visual_counts = visual_counts or [plan.num_visual] * len(samples)
    records = []
    for row, sample in enumerate(samples):
        layers = [{"layer": d.layer, "visual_in": d.visual_in[row], "rank": d.rank[row],
                   "keep_count": d.keep_count[row], "recycled": d.recycled[row]} for d in result.decisions]
        first_width = result.decisions[0].keep_count[row] if plan.method == "fastervlm" else visual_counts[row]
        segments = [{"index": 0, "after_layer": None, "visual_width": first_width,
                     "seq_len": result.segment_lengths[0][row]}]
        for index, decision in enumerate(closing, start=1):
            segments.append({"index": index, "after_layer": decision.layer,
                             "visual_width": plan.region_width(decision.visual_in[row], decision.keep_count[row]),
                             "seq_len": result.segment_lengths[index][row]})
        records.append({"index": sample.index, "sample": sample.key, "origin": sample.origin,
                        "layers": layers, "segments": segments})
    return records


def run_batch(vlm: SparseLlava, samples: Sequence[CalibrationSample], raw_prompts: bool = False) -> list[dict]:
    images = [s.load_image() for s in samples]
    try:
        inputs = vlm.prepare(images, [s.prompt for s in samples], chat_template=not raw_prompts)
        vision_in, counts, batch = build_batch(vlm.spec, inputs["input_ids"], inputs["pixel_values"],
                                               image_layout(inputs))
    except InputError as error:  # its "prompt N" counts rows of this batch: name the sample instead
        row = re.match(r"prompt (\d+):", str(error))
        where = samples[int(row.group(1))].origin if row else ", ".join(s.origin for s in samples)
        raise CalibrationDataError(f"{where}: {error}") from error
    result = prefill(vlm.executor, vlm.plan, batch, vision_in)
    return records_from_prefill(result, vlm.plan, samples, counts)


def _batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]


# --------------------------------------------------------------------------------------
# Summaries
# --------------------------------------------------------------------------------------

def value_stats(values: list) -> dict | None:
    """min / median / max (None where the method records no value, e.g. rank for v1.5)."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def layer_summaries(records: list[dict]) -> list[dict]:
    positions = range(len(records[0]["layers"]))
    return [{"layer": records[0]["layers"][p]["layer"],
             **{name: value_stats([r["layers"][p][name] for r in records])
                for name in ("keep_count", "rank", "recycled")}}
            for p in positions]


def segment_profiles(records: list[dict], max_profiles: int, coverage: float) -> list[dict]:
    out = []
    for index in range(1, len(records[0]["segments"])):
        widths = [r["segments"][index]["visual_width"] for r in records]
        # More profiles than distinct widths cannot lower the padding (each width already gets
        # its own), so the search never sizes its tables beyond them.
        plan = choose_buckets(widths, min(max_profiles, len(set(widths))), coverage)
        out.append({"index": index, "after_layer": records[0]["segments"][index]["after_layer"],
                    "dim": "visual_width", "buckets": [b.as_list() for b in plan.buckets],
                    "coverage": round(plan.coverage, 6), "expected_padding": round(plan.expected_padding, 6)})
    return out


def build_calibration(records: list[dict], vlm: SparseLlava, max_profiles: int, coverage: float) -> dict:
    return {"schema": CALIBRATION_SCHEMA, "model": str(vlm.model.name_or_path),
            "config_sha256": config_sha256(vlm.model), "method": vlm.plan.config.to_dict(), "num_samples": len(records),
            "coverage_target": coverage, "max_profiles": max_profiles,
            "segments": segment_profiles(records, max_profiles, coverage),
            "layers": layer_summaries(records)}


# --------------------------------------------------------------------------------------
# The API
# --------------------------------------------------------------------------------------

def check_options(max_profiles: int, coverage: float, batch_size: int) -> None:
    """Fail on bad options before a model is loaded."""
    if not isinstance(max_profiles, int) or max_profiles < 1:
        raise ValueError(f"max_profiles: expected a positive integer, got {max_profiles!r}")
    if not isinstance(coverage, (int, float)) or not 0.0 < coverage <= 1.0:
        raise ValueError(f"coverage: expected a fraction in (0, 1], got {coverage!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")


def check_output_location(out_dir: Path) -> None:
    """`out_dir` can receive the run's files: checked before the model loads, not after the run."""
    from sparsevlm.cli import OutputLocationError, probe_writable_directory
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputLocationError(f"out: {out_dir} exists and is not a directory")
    probe_writable_directory(out_dir, "out")
    for name in (CALIBRATION_FILE, REPORT_FILE):
        if (out_dir / name).is_dir():
            raise OutputLocationError(f"out: {out_dir / name} is a directory; expected room for a file")


def collect_records(vlm: SparseLlava, samples: list[CalibrationSample], store: SampleStore,
                    reusable: dict, batch_size: int, raw_prompts: bool, progress: bool,
                    on_batch: Callable[[int, int], None] | None) -> tuple[list[dict], int]:
    """Records for every sample in index order, running only those not in `reusable`; each
    batch is on disk before the next starts. Returns (records, samples computed)."""
    records = {s.index: reusable[(s.index, s.key)] for s in samples if (s.index, s.key) in reusable}
    pending = [s for s in samples if s.index not in records]
    with tqdm(total=len(samples), initial=len(records), unit="sample", desc="calibrating",
              disable=not progress) as bar:
        for batch in _batches(pending, batch_size):
            new = run_batch(vlm, batch, raw_prompts)
            store.append(new)
            records.update((r["index"], r) for r in new)
            bar.update(len(new))
            if on_batch is not None:
                on_batch(len(records), len(samples))
    return [records[s.index] for s in samples], len(pending)


def calibrate(model, config: SparseVLMConfig | None, data, out_dir, max_profiles: int = 4,
              coverage: float = 0.995, batch_size: int = 8, *, raw_prompts: bool = False,
              dtype: str = "float32", device: str = "cpu", overwrite: bool = False, progress: bool = True,
              on_batch: Callable[[int, int], None] | None = None, report: bool = True,
              console=None) -> CalibrationResult:
    """Calibrate the profiles of every segment that starts by pruning.

    model: a local directory, hub id, alias or "demo" (see `sparsevlm.methods.loading`), or
        a SparseLlava. config: the method (SparseVLMConfig).
    data: a JSONL path ({"image", "prompt"} per line) or a list of CalibrationSample
        (e.g. `synthetic_samples(n)`).
    out_dir: receives samples.jsonl (appended per batch; a re-run resumes from it),
        calibration.json and report.png.
    on_batch(done, total): called after each batch is saved (progress hooks, tests).
    """
    from .report import print_summary, write_report

    check_options(max_profiles, coverage, batch_size)
    out_dir = Path(out_dir).expanduser()
    check_output_location(out_dir)
    samples = load_jsonl(data, raw_prompts) if isinstance(data, (str, Path)) else list(data)
    if not samples:
        raise CalibrationDataError("data: the calibration set is empty")
    vlm = load_model(model, config, dtype, device)
    if not vlm.plan.prune_layers and vlm.plan.method != "fastervlm":
        raise ValueError(f"method {vlm.plan.method!r} prunes nothing: there is nothing to calibrate")
    if max_profiles > vlm.plan.num_visual:
        raise ValueError(f"max_profiles: {max_profiles} is more than the model's {vlm.plan.num_visual} visual "
                         f"tokens (at most one profile per visual width); expected 1..{vlm.plan.num_visual}")
    identity = run_identity(vlm, raw_prompts)
    store = SampleStore(out_dir, run_key(identity), identity)
    reusable = store.open(overwrite)
    records, computed = collect_records(vlm, samples, store, reusable, batch_size, raw_prompts, progress, on_batch)

    calibration = build_calibration(records, vlm, max_profiles, coverage)
    atomic_file(out_dir / CALIBRATION_FILE, json.dumps(calibration, indent=1) + "\n")
    panels = write_report(records, calibration, out_dir / REPORT_FILE) if report else 0
    print_summary(calibration, console=console)
    return CalibrationResult(out_dir, calibration, records, computed, len(samples) - computed, panels)
