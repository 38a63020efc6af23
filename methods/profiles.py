"""The optimization-profile contract: which profile serves a visual width, what it costs,
and the `calibration.json` file that carries the profiles from calibration to export.

One home for the rule, below its users: the runtime's generation loop asks it which width
to run (`SegmentProfiles.choose`), the TensorRT executor picks its execution context with
it (`profile_for_shapes`), calibration prices candidate buckets with it (`serving_cost`) and
export reads `calibration.json` through `read_calibration` / `check_calibration`. Nothing
here keeps state between calls: every function is pure.

The rule (`select_profile`), for one pruning segment's visual width W and its profiles
[(min, opt, max), ...] in manifest order:

1. Among the profiles whose [min, max] contains W, the one with the smallest max (the
   cheapest: TensorRT plans a profile's kernels and memory for its max); on equal maxima the
   first in manifest order. With overlapping profiles [(1, 50, 100), (1, 20, 40)] and W = 30
   that is profile 1, not the first containing one.
2. Else, when some profile starts above W: W is padded up to the smallest such `min` (the
   padding slots are masked, so the result does not change), and the profile is chosen among
   those starting there by rule 1. So `select_profile(profiles, padded_width)` picks the same
   profile again: the width actually run selects the profile on its own, which is how the
   TensorRT executor finds it from the input shapes.
3. Else (W is above every max): `ProfileError`, naming the segment and the profiles.

A width served by a profile with maximum M is priced M - W padding tokens (calibration's
cost model).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

log = logging.getLogger(__name__)

Range = tuple[int, int, int]  # (min, opt, max)


class ProfileError(ValueError):
    """No optimization profile can hold the requested length."""


@dataclass(frozen=True)
class ProfileChoice:
    segment: int
    width: int  # the width the method asked for
    profile: int  # index into the segment's profiles
    padded_width: int  # the width actually run (>= width)
    bounds: tuple[int, int, int]

    def to_json(self) -> dict:
        return {"segment": self.segment, "width": self.width, "profile": self.profile,
                "padded_width": self.padded_width, "min_opt_max": list(self.bounds)}


def _cheapest(profiles: Sequence[Range], indices: list[int]) -> int:
    """Smallest max, then manifest order."""
    return min(indices, key=lambda index: (profiles[index][2], index))


def select_profile(profiles: Sequence[Range], width: int, segment: int = 0) -> ProfileChoice:
    """The profile that serves `width` and the width it runs at (the module's rule)."""
    if not profiles:
        raise ProfileError(f"segment {segment}: no optimization profiles")
    containing = [i for i, (low, _, high) in enumerate(profiles) if low <= width <= high]
    if containing:
        index = _cheapest(profiles, containing)
        return ProfileChoice(segment, width, index, width, tuple(profiles[index]))
    larger = [low for low, _, _ in profiles if low > width]
    if larger:
        padded = min(larger)
        index = _cheapest(profiles, [i for i, (low, _, _) in enumerate(profiles) if low == padded])
        return ProfileChoice(segment, width, index, padded, tuple(profiles[index]))
    ranges = ", ".join(f"[{lo}, {hi}]" for lo, _, hi in profiles)
    raise ProfileError(f"segment {segment}: visual width {width} is above every optimization profile ({ranges}); "
                       "re-export with wider buckets (sparsevlm-calibrate / --calibration)")


def serving_cost(profiles: Sequence[Range], width: int) -> int | None:
    """Padding tokens the runtime pays for `width` (the served profile's max - width), or
    None when no profile can serve it."""
    try:
        choice = select_profile(profiles, width)
    except ProfileError:
        return None
    return choice.bounds[2] - width


class SegmentProfiles:
    """The visual-width profiles of each pruning segment, read once from a manifest; the
    policy `choose(segment, width) -> ProfileChoice` the generation loop asks between
    segments. Immutable in use: it records nothing, so concurrent runs share it."""

    def __init__(self, profiles: dict[int, list[Range]]):
        self.profiles = {segment: [tuple(p) for p in ranges] for segment, ranges in profiles.items()}

    @classmethod
    def from_manifest(cls, manifest: dict) -> "SegmentProfiles":
        return cls(segment_profiles(manifest))

    def choose(self, segment: int, width: int) -> ProfileChoice:
        choice = select_profile(self.profiles[segment], width, segment)
        log.debug("segment %d: visual width %d -> profile %d %s (run at %d)", segment, width, choice.profile,
                  list(choice.bounds), choice.padded_width)
        return choice


def segment_profiles(manifest: dict) -> dict[int, list[Range]]:
    """{segment index: its profiles' [min, opt, max] of the pruned dimension} for the
    segments that start by pruning."""
    out = {}
    for segment in manifest["segments"]:
        if segment["profile_dim"]:
            graph = manifest["graphs"][segment["graph"]]
            out[segment["index"]] = [tuple(p[segment["profile_dim"]]) for p in graph["profiles"]]
    return out


def profile_for_shapes(profile_shapes: Sequence[dict[str, tuple]], shapes: dict[str, tuple]) -> int | None:
    """Which of an engine's profiles runs a call with these input shapes: `profile_shapes[p]`
    maps each input to its (min, opt, max) shapes in profile p. Among the profiles containing
    every shape, the one with the smallest max shapes (compared input by input in name
    order), then the first: for a pruning segment, whose profiles differ only in the
    `visual_width` bucket, that is `select_profile` on the width run. None: no profile holds
    the call."""
    def contains(bounds: dict) -> bool:
        for name, shape in shapes.items():
            low, _, high = bounds[name]
            if len(shape) != len(low) or not all(lo <= d <= hi for lo, d, hi in zip(low, shape, high)):
                return False
        return True

    def size(index: int) -> tuple:
        bounds = profile_shapes[index]
        return tuple(tuple(bounds[name][2]) for name in sorted(shapes)), index

    fitting = [index for index, bounds in enumerate(profile_shapes) if contains(bounds)]
    return min(fitting, key=size) if fitting else None


# --------------------------------------------------------------------------------------
# calibration.json: written by sparsevlm-calibrate, read and checked before an export uses it
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


def calibration_bucket_lists(data: dict) -> list[list[list[int]]]:
    """The bucket lists of a checked calibration, in segment order."""
    return [[list(b) for b in s["buckets"]] for s in sorted(data["segments"], key=lambda s: s["index"])]


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
    return calibration_bucket_lists(data)
