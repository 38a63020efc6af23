"""sparsevlm.calibration: record what the pruning layers decide over a calibration set and
choose each pruned segment's optimization profiles (`calibration.json`, docs/interfaces.md)."""

from .buckets import Bucket, BucketPlan, choose_buckets, serving_cost
from .data import CalibrationDataError, CalibrationSample, load_jsonl, synthetic_samples
from .runner import CalibrationResult, calibrate
from .store import CalibrationStateError

__all__ = ["Bucket", "BucketPlan", "CalibrationDataError", "CalibrationResult", "CalibrationSample",
           "CalibrationStateError", "calibrate", "choose_buckets", "load_jsonl", "serving_cost",
           "synthetic_samples"]
