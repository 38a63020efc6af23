"""calibrate -> sparsevlm-export --calibration -> runtime: on prompts the calibration never
saw, the profile planner picks, for every pruned segment, a profile that contains the
visual width the method asked for (no padding up, no error)."""

import pytest

export_module = pytest.importorskip("sparsevlm.export", reason="sparsevlm.export is not available")
runtime_module = pytest.importorskip("sparsevlm.runtime", reason="sparsevlm.runtime is not available")
pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")

from sparsevlm.calibration import calibrate, synthetic_samples  # noqa: E402
from sparsevlm.methods import SparseVLMConfig  # noqa: E402
from sparsevlm.methods.demo_model import build_demo_model  # noqa: E402

SCALE, BIAS = 8.0, 4.0


@pytest.mark.slow  # exports ONNX graphs: ~45 s of CPU
def test_runtime_picks_a_containing_profile_on_unseen_prompts(tmp_path):
    demo = build_demo_model(tmp_path / "demo")
    config = SparseVLMConfig(method="sparsevlm", variant="v1.0", scale=SCALE, bias=BIAS)
    # every question template of the synthetic set appears in 30 samples, so the unseen
    # prompts below (other images, other colour/shape words) stay inside the calibrated range
    calibration = calibrate(str(demo), config, synthetic_samples(30, seed=0), tmp_path / "calib",
                            max_profiles=3, coverage=1.0, batch_size=10, progress=False, report=False)
    segments = calibration.calibration["segments"]
    assert any(len(s["buckets"]) > 1 for s in segments)

    artifact = tmp_path / "artifact"
    export_module.export(str(demo), artifact, method="sparsevlm", variant="v1.0", budgets=None, scale=SCALE,
                         bias=BIAS, calibration=str(calibration.calibration_path), progress=False)
    pipeline = runtime_module.Pipeline.load(artifact, backend="onnxruntime")

    unseen = synthetic_samples(4, seed=1)
    for sample in unseen:
        out = pipeline.generate([sample.load_image()], [sample.prompt], max_new_tokens=1)
        assert [c["segment"] for c in out.profiles] == [s["index"] for s in segments]
        for choice, segment in zip(out.profiles, segments):
            low, _, high = choice["min_opt_max"]
            assert [low, choice["min_opt_max"][1], high] in segment["buckets"]  # the calibrated profiles
            assert low <= choice["width"] <= high and choice["padded_width"] == choice["width"]
