"""The profile planner: after each pruning segment, the next segment's visual width W (max
over rows of kept + recycled tokens) selects the optimization profile that contains it.

Fallback, documented: when no profile contains W but a larger one exists, W is padded up
to that profile's `min` (the extra visual slots are masked padding, so results do not
change); when W exceeds every profile's `max` it is an error naming the segment and the
profiles. Choices are logged (logger `sparsevlm.runtime.profiles`, DEBUG) and returned for
the trace."""

from __future__ import annotations

import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)


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


def select_profile(profiles: list[tuple[int, int, int]], width: int, segment: int = 0) -> ProfileChoice:
    """The first profile whose [min, max] contains `width`; else the nearest larger one
    (padding to its min); else ProfileError."""
    if not profiles:
        raise ProfileError(f"segment {segment}: no optimization profiles")
    for index, (low, opt, high) in enumerate(profiles):
        if low <= width <= high:
            return ProfileChoice(segment, width, index, width, (low, opt, high))
    larger = [(low, index) for index, (low, _, _) in enumerate(profiles) if low > width]
    if larger:
        low, index = min(larger)
        return ProfileChoice(segment, width, index, low, tuple(profiles[index]))
    ranges = ", ".join(f"[{lo}, {hi}]" for lo, _, hi in profiles)
    raise ProfileError(f"segment {segment}: visual width {width} is above every optimization profile ({ranges}); "
                       "re-export with wider buckets (sparsevlm-calibrate / --calibration)")


class ProfilePlanner:
    """Per pruning segment, the visual-width profiles from the manifest."""

    def __init__(self, manifest: dict):
        self.profiles = {}
        for segment in manifest["segments"]:
            if segment["profile_dim"]:
                graph = manifest["graphs"][segment["graph"]]
                self.profiles[segment["index"]] = [tuple(p[segment["profile_dim"]]) for p in graph["profiles"]]
        self.choices: list[ProfileChoice] = []

    def reset(self) -> None:
        self.choices = []

    def choose(self, segment: int, width: int) -> ProfileChoice:
        choice = select_profile(self.profiles[segment], width, segment)
        log.debug("segment %d: visual width %d -> profile %d %s (run at %d)", segment, width, choice.profile,
                  list(choice.bounds), choice.padded_width)
        self.choices.append(choice)
        return choice
