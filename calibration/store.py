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

# calibration.json (written by runner.py) has its schema and checks with the profile
# contract it carries; re-exported for calibration's users.
from sparsevlm.methods.profiles import (CALIBRATION_SCHEMA, CalibrationFileError, check_calibration,  # noqa: F401
                                        read_calibration)

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
