"""`samples.jsonl`: the per-sample records of a calibration run, appended batch by batch.

The first line is a header naming the run (model, method, prompt mode) by a hash; every
record carries that hash, the sample index and the sample's content hash. A re-run with the
same run hash skips the samples already recorded (same index and content) and appends the
rest, so an interrupted run loses at most the batch in flight. A run with a different hash
refuses to mix into the file unless told to start over. A torn last line (the process was
killed while writing it) is dropped on resume.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

SAMPLES_SCHEMA = "sparsevlm-calibration-samples/1"
SAMPLES_FILE = "samples.jsonl"


class CalibrationStateError(RuntimeError):
    """The output directory holds records that cannot be resumed by this run."""


def run_key(identity: dict) -> str:
    """Stable hash of what determines the records: model, method config, prompt mode."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def _read_lines(path: Path) -> tuple[list[dict], int]:
    """Parsed lines and the byte length of the intact part (a torn last line is excluded)."""
    data = path.read_bytes()
    parsed, intact = [], 0
    for raw in data.splitlines(keepends=True):
        complete = raw.endswith(b"\n")
        try:
            entry = json.loads(raw)
        except json.JSONDecodeError:
            entry = None
        if entry is None or not complete:
            if intact + len(raw) == len(data):  # the last line: torn by an interruption
                break
            raise CalibrationStateError(f"{path}: corrupt record at byte {intact}; "
                                        "delete the file (or pass --overwrite) to start over")
        parsed.append(entry)
        intact += len(raw)
    return parsed, intact


class SampleStore:
    def __init__(self, out_dir: Path, key: str, identity: dict):
        self.path = Path(out_dir) / SAMPLES_FILE
        self.key, self.identity = key, identity

    def open(self, overwrite: bool = False) -> dict[tuple[int, str], dict]:
        """Prepare the file for appending; return the records this run can reuse, by
        (sample index, sample hash). The latest record of a sample wins."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if overwrite or not self.path.exists():
            self._write_header()
            return {}
        lines, intact = _read_lines(self.path)
        if not lines:
            self._write_header()
            return {}
        header = lines[0]
        if header.get("schema") != SAMPLES_SCHEMA:
            raise CalibrationStateError(f"{self.path}: not a calibration samples file (schema "
                                        f"{header.get('schema')!r}, expected {SAMPLES_SCHEMA!r})")
        if header.get("run") != self.key:
            raise CalibrationStateError(
                f"{self.path}: holds samples of another run (model/method {header.get('identity')}); "
                f"this run is {self.identity}. Use another --out directory, or --overwrite to discard them")
        if intact < self.path.stat().st_size:
            with self.path.open("r+b") as handle:
                handle.truncate(intact)
        return {(r["index"], r["sample"]): r for r in lines[1:] if r.get("run") == self.key}

    def _write_header(self) -> None:
        header = {"schema": SAMPLES_SCHEMA, "run": self.key, "identity": self.identity}
        with self.path.open("w", encoding="utf-8") as handle:
            handle.write(json.dumps(header) + "\n")

    def append(self, records: list[dict]) -> None:
        """Append and make durable before returning: the batch is then never recomputed."""
        text = "".join(json.dumps({"run": self.key, **r}) + "\n" for r in records)
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())


# --------------------------------------------------------------------------------------
# calibration.json: read and checked before an export uses it
# --------------------------------------------------------------------------------------

CALIBRATION_SCHEMA = "sparsevlm-calibration/1"


class CalibrationFileError(ValueError):
    """A calibration.json that cannot be used (the message names the file and the field)."""


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def read_calibration(path: str | Path) -> dict:
    """Load `calibration.json` and check its shape: schema, identity fields, and per pruned
    segment a non-empty list of [min, opt, max] integer buckets with 1 <= min <= opt <= max.
    Model-dependent checks are `check_calibration`'s."""
    path = Path(path).expanduser()
    where = f"calibration: {path}"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CalibrationFileError(f"{where} does not exist (expected calibration.json from sparsevlm-calibrate)") from None
    except IsADirectoryError:
        raise CalibrationFileError(f"{where} is a directory; pass its calibration.json") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CalibrationFileError(f"{where} is not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise CalibrationFileError(f"{where}: expected a JSON object, got {type(data).__name__}")
    if data.get("schema") != CALIBRATION_SCHEMA:
        raise CalibrationFileError(f"{where} has schema {data.get('schema')!r}; expected {CALIBRATION_SCHEMA!r}")
    if not isinstance(data.get("config_sha256"), str):
        raise CalibrationFileError(f"{where} records no model (config_sha256); it predates model checks: "
                                   "run sparsevlm-calibrate again")
    if not isinstance(data.get("method"), dict):
        raise CalibrationFileError(f"{where}: 'method' must be the method's settings object")
    segments = data.get("segments")
    if not isinstance(segments, list):
        raise CalibrationFileError(f"{where}: 'segments' must be a list (one entry per pruned segment)")
    for position, segment in enumerate(segments):
        field = f"segments[{position}]"
        if not isinstance(segment, dict) or not _is_int(segment.get("index")):
            raise CalibrationFileError(f"{where}: {field} must be an object with an integer 'index'")
        buckets = segment.get("buckets")
        if not isinstance(buckets, list) or not buckets:
            raise CalibrationFileError(f"{where}: {field} (segment {segment['index']}) has no buckets; "
                                       "expected a non-empty list of [min, opt, max]")
        for number, bucket in enumerate(buckets):
            if not (isinstance(bucket, list) and len(bucket) == 3 and all(_is_int(v) for v in bucket)):
                raise CalibrationFileError(f"{where}: {field}.buckets[{number}] is {bucket!r}; "
                                           "expected [min, opt, max] integers")
            low, opt, high = bucket
            if not 1 <= low <= opt <= high:
                raise CalibrationFileError(f"{where}: {field}.buckets[{number}] is {bucket}; "
                                           "expected 1 <= min <= opt <= max")
    return data


def check_calibration(data: dict, path: str | Path, method: dict, config_sha256: str, num_segments: int,
                      max_width: int, fixed_widths: list[int] | None = None) -> list[list[list[int]]]:
    """The buckets of `data` (from `read_calibration`) for an export of `method` on the model
    whose config hashes to `config_sha256`: it must have been recorded on that model with that
    method, have one bucket list per pruned segment (indices 1..num_segments), widths within
    [1, max_width], and (fixed_widths, methods whose widths do not depend on the input) a
    bucket containing each segment's width. Returns the bucket lists in segment order."""
    where = f"calibration: {path}"
    if data["config_sha256"] != config_sha256:
        raise CalibrationFileError(f"{where} was recorded on another model (config hash "
                                   f"{data['config_sha256'][:12]}..., model {data.get('model')!r}); this export's "
                                   f"model hashes to {config_sha256[:12]}...: calibrate this model")
    if data["method"] != method:
        recorded = {k: v for k, v in data["method"].items() if v != method.get(k)}
        raise CalibrationFileError(f"{where} was recorded for another method setting ({recorded}); "
                                   f"this export is {method}")
    segments = sorted(data["segments"], key=lambda s: s["index"])
    indices = [s["index"] for s in segments]
    if indices != list(range(1, num_segments + 1)):
        raise CalibrationFileError(f"{where} has buckets for segments {indices}; this method prunes before "
                                   f"segments {list(range(1, num_segments + 1))}")
    for segment in segments:
        for bucket in segment["buckets"]:
            if bucket[2] > max_width:
                raise CalibrationFileError(f"{where}: segment {segment['index']} bucket {bucket} is wider than the "
                                           f"{max_width} visual tokens this method can keep")
    for segment, width in zip(segments, fixed_widths or []):
        if not any(low <= width <= high for low, _, high in segment["buckets"]):
            raise CalibrationFileError(f"{where}: segment {segment['index']} always runs at visual width {width}, "
                                       f"which no bucket {segment['buckets']} contains")
    return [[list(b) for b in s["buckets"]] for s in segments]
