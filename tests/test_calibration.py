"""sparsevlm-calibrate end to end on the demo model: records, calibration.json, report,
resume after an interruption, bad inputs."""

import json
import statistics

import pytest
from PIL import Image

from sparsevlm.calibration import (CalibrationDataError, CalibrationStateError, calibrate, load_jsonl,
                                   synthetic_samples)
from sparsevlm.calibration import cli, runner
from sparsevlm.calibration.report import PANEL_HEIGHT_IN, PANEL_WIDTH_IN, DPI
from sparsevlm.methods import SparseLlava, SparseVLMConfig
from sparsevlm.methods.demo_model import build_demo_model
from sparsevlm.methods.generation import make_region_batch, prefill

# v1.0 rank rule with a small scale: the demo's ranks (1..~11, set by the prompt's raters)
# then give keep counts that differ across prompts instead of all hitting the v - 1 cap.
SCALE, BIAS = 8.0, 4.0
CONFIG = SparseVLMConfig(method="sparsevlm", variant="v1.0", scale=SCALE, bias=BIAS)
NUM_SAMPLES = 16
PRUNE_LAYERS = [2, 6, 15, 19]


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    return build_demo_model(tmp_path_factory.mktemp("calibration-demo") / "demo")


@pytest.fixture(scope="module")
def vlm(demo_dir):
    return SparseLlava.from_pretrained(str(demo_dir), CONFIG)


@pytest.fixture(scope="module")
def calibrated(vlm, tmp_path_factory):
    out = tmp_path_factory.mktemp("calibrated")
    result = calibrate(vlm, CONFIG, synthetic_samples(NUM_SAMPLES), out, max_profiles=3, coverage=0.9,
                       batch_size=8, progress=False)
    return result


def strip(record):
    return {k: v for k, v in record.items() if k != "run"}


# --------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------

def expected_keep(rank, visual_in):
    """SparseVLM v1.0 code rule, stated independently of the method package."""
    if rank == visual_in:
        return visual_in
    return min(max(int(rank * SCALE + BIAS), 0), visual_in - 1)


def test_keep_counts_vary_across_prompts(calibrated):
    keeps = [r["layers"][0]["keep_count"] for r in calibrated.records]
    assert len(set(keeps)) >= 3


def test_records_follow_the_rank_rule_and_segment_arithmetic(calibrated):
    for record in calibrated.records:
        layers, segments = record["layers"], record["segments"]
        assert [l["layer"] for l in layers] == PRUNE_LAYERS
        assert [s["after_layer"] for s in segments] == [None] + PRUNE_LAYERS
        assert layers[0]["visual_in"] == segments[0]["visual_width"] == 576
        text_and_prefix = segments[0]["seq_len"] - 576
        for position, layer in enumerate(layers):
            assert layer["keep_count"] == expected_keep(layer["rank"], layer["visual_in"])
            width = segments[position + 1]["visual_width"]
            assert width == layer["keep_count"] + layer["recycled"]
            assert segments[position + 1]["seq_len"] == text_and_prefix + width  # text length is unchanged
            if position + 1 < len(layers):
                assert layers[position + 1]["visual_in"] == width


def test_batched_records_equal_batch_one_runs(calibrated, vlm):
    sample = synthetic_samples(NUM_SAMPLES)[5]
    inputs = vlm.prepare([sample.load_image()], [sample.prompt])
    batch = make_region_batch(inputs["input_ids"], vlm.model.config.image_token_id, vlm.plan.num_visual, vlm.pad_id)
    alone = prefill(vlm.executor, vlm.plan, batch, inputs["pixel_values"])
    record = calibrated.records[5]
    assert [l["keep_count"] for l in record["layers"]] == [d.keep_count[0] for d in alone.decisions]
    assert [l["rank"] for l in record["layers"]] == [d.rank[0] for d in alone.decisions]
    assert [s["seq_len"] for s in record["segments"]] == [lengths[0] for lengths in alone.segment_lengths]


# --------------------------------------------------------------------------------------
# calibration.json
# --------------------------------------------------------------------------------------

def test_calibration_json_follows_the_interface(calibrated, demo_dir):
    written = json.loads(calibrated.calibration_path.read_text())
    assert written == calibrated.calibration
    assert set(written) == {"schema", "model", "config_sha256", "method", "num_samples", "coverage_target",
                            "max_profiles", "segments", "layers"}
    assert written["schema"] == "sparsevlm-calibration/1"
    assert written["model"] == str(demo_dir)
    assert SparseVLMConfig.from_dict(written["method"]) == SparseVLMConfig(
        method="sparsevlm", variant="v1.0", scale=SCALE, bias=BIAS)
    assert (written["num_samples"], written["coverage_target"], written["max_profiles"]) == (NUM_SAMPLES, 0.9, 3)
    assert [s["index"] for s in written["segments"]] == [1, 2, 3, 4]
    assert [s["after_layer"] for s in written["segments"]] == PRUNE_LAYERS
    for segment in written["segments"]:
        assert set(segment) == {"index", "after_layer", "dim", "buckets", "coverage", "expected_padding"}
        assert segment["dim"] == "visual_width"
        assert 1 <= len(segment["buckets"]) <= 3
        assert all(low <= opt <= high for low, opt, high in segment["buckets"])


def test_segment_coverage_and_padding_match_the_recorded_widths(calibrated):
    for segment in calibrated.calibration["segments"]:
        widths = [r["segments"][segment["index"]]["visual_width"] for r in calibrated.records]
        top = segment["buckets"][-1][2]
        served = [w for w in widths if w <= top]
        assert segment["coverage"] == pytest.approx(len(served) / len(widths)) and segment["coverage"] >= 0.9
        padding = sum(next(high for low, _, high in segment["buckets"] if w <= high) - w for w in served)
        assert segment["expected_padding"] == pytest.approx(padding / sum(served), abs=1e-6)


def test_layer_statistics(calibrated):
    for position, layer in enumerate(calibrated.calibration["layers"]):
        assert layer["layer"] == PRUNE_LAYERS[position]
        for name in ("keep_count", "rank", "recycled"):
            values = [r["layers"][position][name] for r in calibrated.records]
            assert layer[name] == {"min": min(values), "median": statistics.median(values), "max": max(values)}


def test_report_has_one_panel_per_pruning_layer(calibrated):
    assert calibrated.report_panels == len(PRUNE_LAYERS)
    with Image.open(calibrated.report_path) as image:
        image.load()
        assert image.size == (int(PANEL_WIDTH_IN * DPI), int(PANEL_HEIGHT_IN * DPI) * len(PRUNE_LAYERS))


# --------------------------------------------------------------------------------------
# CLI, other rules, raw prompts
# --------------------------------------------------------------------------------------

def test_cli_writes_outputs_and_prints_the_summary(demo_dir, tmp_path, capsys):
    code = cli.main(["--model", str(demo_dir), "--variant", "v1.0", "--scale", str(SCALE), "--bias", str(BIAS),
                     "--synthetic", "4", "--batch-size", "4", "--max-profiles", "2", "--out", str(tmp_path),
                     "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0
    calibration = json.loads((tmp_path / "calibration.json").read_text())
    assert calibration["num_samples"] == 4 and calibration["max_profiles"] == 2
    assert (tmp_path / "report.png").is_file()
    assert "expected padding" in out and "keep min/med/max" in out
    for layer in calibration["layers"]:
        assert f"{layer['keep_count']['min']} / {layer['keep_count']['median']:g} / {layer['keep_count']['max']}" in out


def test_fixed_schedule_gives_one_exact_profile(vlm, tmp_path):
    config = SparseVLMConfig(method="sparsevlm", variant="v1.5", budget=192)
    result = calibrate(vlm, config, synthetic_samples(3), tmp_path, batch_size=3, progress=False)
    assert [l["keep_count"]["min"] for l in result.calibration["layers"]] == [300, 200, 110]
    for segment in result.calibration["segments"]:
        assert len(segment["buckets"]) == 1 and segment["expected_padding"] == 0.0
        low, opt, high = segment["buckets"][0]
        assert low == opt == high


def test_fixed_count_methods(vlm, tmp_path):
    fastv = calibrate(vlm, SparseVLMConfig(method="fastv", K=2, R=0.5), synthetic_samples(2), tmp_path / "fastv",
                      batch_size=2, progress=False)
    assert [s["buckets"] for s in fastv.calibration["segments"]] == [[[288, 288, 288]]]
    assert fastv.calibration["layers"][0]["rank"] is None and fastv.report_panels == 1
    fastervlm = calibrate(vlm, SparseVLMConfig(method="fastervlm", budget=144), synthetic_samples(2),
                          tmp_path / "fastervlm", batch_size=2, progress=False, report=False)
    assert fastervlm.calibration["segments"] == []  # pruned before the LLM: nothing dynamic to profile
    assert fastervlm.calibration["layers"][0]["keep_count"] == {"min": 144, "median": 144, "max": 144}


def test_raw_prompt_the_model_rejects_names_its_line(vlm, tmp_path, good_image):
    data = write_jsonl(tmp_path / "data.jsonl", [
        json.dumps({"image": good_image, "prompt": "USER: <image>\nColor? ASSISTANT:"}),
        json.dumps({"image": good_image, "prompt": "USER: What? ASSISTANT: <image>"})])  # nothing after the image
    with pytest.raises(CalibrationDataError, match=r"data.jsonl:2: prompt 1: nothing follows the image"):
        calibrate(vlm, CONFIG, data, tmp_path / "out", batch_size=2, raw_prompts=True, progress=False)


def test_raw_prompts_give_the_same_records_as_the_chat_template(vlm, calibrated, tmp_path):
    samples = synthetic_samples(2)
    entries = []
    for sample in samples:
        image_path = tmp_path / f"{sample.index}.png"
        sample.load_image().save(image_path)
        entries.append({"image": image_path.name, "prompt": f"USER: <image>\n{sample.prompt} ASSISTANT:"})
    data = tmp_path / "raw.jsonl"
    data.write_text("".join(json.dumps(e) + "\n" for e in entries))
    result = calibrate(vlm, CONFIG, data, tmp_path / "out", batch_size=2, raw_prompts=True, progress=False,
                       report=False)
    for raw, templated in zip(result.records, calibrated.records):
        assert raw["layers"] == templated["layers"] and raw["segments"] == templated["segments"]


# --------------------------------------------------------------------------------------
# Interruption and resume
# --------------------------------------------------------------------------------------

def test_interrupted_run_keeps_finished_batches_and_resumes(vlm, calibrated, tmp_path, monkeypatch):
    def interrupt_after_first_batch(done, total):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        calibrate(vlm, CONFIG, synthetic_samples(12), tmp_path, batch_size=4, progress=False,
                  on_batch=interrupt_after_first_batch)
    saved = (tmp_path / "samples.jsonl").read_text().splitlines()
    assert len(saved) == 1 + 4  # header + the first batch
    assert not (tmp_path / "calibration.json").exists()
    with (tmp_path / "samples.jsonl").open("a") as handle:
        handle.write('{"run": "torn", "index": 4, "sam')  # killed while writing the next batch

    run_indices = []
    real_run_batch = runner.run_batch

    def counting_run_batch(model, samples, raw_prompts=False):
        run_indices.extend(s.index for s in samples)
        return real_run_batch(model, samples, raw_prompts)

    monkeypatch.setattr(runner, "run_batch", counting_run_batch)
    result = calibrate(vlm, CONFIG, synthetic_samples(12), tmp_path, batch_size=4, progress=False, report=False)
    assert run_indices == list(range(4, 12))
    assert (result.computed, result.resumed) == (8, 4)
    assert [strip(r) for r in result.records] == [strip(r) for r in calibrated.records[:12]]
    lines = (tmp_path / "samples.jsonl").read_text().splitlines()
    assert len(lines) == 1 + 12 and all(json.loads(line) for line in lines)  # the torn line is gone

    run_indices.clear()
    again = calibrate(vlm, CONFIG, synthetic_samples(12), tmp_path, batch_size=4, progress=False, report=False)
    assert run_indices == [] and again.resumed == 12


def test_another_config_does_not_mix_into_the_samples(vlm, calibrated, tmp_path):
    calibrate(vlm, CONFIG, synthetic_samples(1), tmp_path, batch_size=1, progress=False, report=False)
    other = SparseVLMConfig(method="sparsevlm", variant="v1.0", scale=SCALE + 1, bias=BIAS)
    with pytest.raises(CalibrationStateError, match="another run"):
        calibrate(vlm, other, synthetic_samples(1), tmp_path, batch_size=1, progress=False, report=False)
    result = calibrate(vlm, other, synthetic_samples(1), tmp_path, batch_size=1, progress=False, report=False,
                       overwrite=True)
    assert result.computed == 1


# --------------------------------------------------------------------------------------
# Bad data
# --------------------------------------------------------------------------------------

def write_jsonl(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def good_image(tmp_path):
    Image.new("RGB", (32, 32), (200, 10, 10)).save(tmp_path / "red.png")
    return "red.png"


def test_relative_image_paths_resolve_against_the_jsonl_directory(tmp_path, good_image, monkeypatch):
    data = write_jsonl(tmp_path / "data.jsonl", [json.dumps({"image": good_image, "prompt": "Color?"}), ""])
    monkeypatch.chdir("/")
    samples = load_jsonl(data)
    assert len(samples) == 1 and samples[0].load_image().size == (32, 32)
    assert samples[0].origin == f"{data}:1"


@pytest.mark.parametrize("lines, message", [
    (['{"image": "red.png", "prompt": "ok"}', '{"image": "red.png", "prompt": '], r"data.jsonl:2: invalid JSON"),
    (['{"image": "red.png"}'], r"data.jsonl:1: missing key\(s\) 'prompt'"),
    (['{"prompt": "x"}'], r"data.jsonl:1: missing key\(s\) 'image'"),
    (['["red.png", "x"]'], r"data.jsonl:1: expected a JSON object"),
    (['{"image": "red.png", "prompt": "ok"}', '', '{"image": "nope.png", "prompt": "x"}'],
     r"data.jsonl:3: image file not found: .*nope.png"),
    (['{"image": "broken.png", "prompt": "x"}'], r"data.jsonl:1: image .*broken.png is not a readable image"),
    (['{"image": "red.png", "prompt": "<image>\\nWhat?"}'], r"data.jsonl:1: prompt contains '<image>'"),
    (['{"image": "red.png", "prompt": ""}'], r"data.jsonl:1: 'prompt' must be a non-empty string"),
    (['', '  '], r"has no samples \(empty calibration set\)"),
])
def test_bad_jsonl_names_the_line(tmp_path, good_image, lines, message):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    data = write_jsonl(tmp_path / "data.jsonl", lines)
    with pytest.raises(CalibrationDataError, match=message):
        load_jsonl(data)


def test_raw_prompt_without_placeholder_is_an_error(tmp_path, good_image):
    data = write_jsonl(tmp_path / "data.jsonl", [json.dumps({"image": good_image, "prompt": "USER: hi ASSISTANT:"})])
    with pytest.raises(CalibrationDataError, match="data.jsonl:1: raw prompt has no image placeholder"):
        load_jsonl(data, raw_prompts=True)


def test_missing_data_file_and_cli_error(tmp_path, capsys):
    with pytest.raises(CalibrationDataError, match="does not exist"):
        load_jsonl(tmp_path / "absent.jsonl")
    bad = write_jsonl(tmp_path / "bad.jsonl", ["{nope"])
    # data errors surface before the model is loaded (this model does not exist)
    code = cli.main(["--model", str(tmp_path / "no-model"), "--data", str(bad), "--out", str(tmp_path / "o")])
    assert code == 2 and "bad.jsonl:1: invalid JSON" in capsys.readouterr().err
    code = cli.main(["--model", str(tmp_path / "no-model"), "--synthetic", "0", "--out", str(tmp_path / "o")])
    assert code == 2 and "positive number of samples" in capsys.readouterr().err


def test_synthetic_set_is_deterministic_and_varied():
    first, second = synthetic_samples(20, seed=3), synthetic_samples(20, seed=3)
    assert [s.key for s in first] == [s.key for s in second]
    assert first[4].load_image().tobytes() == second[4].load_image().tobytes()
    assert first[4].load_image().tobytes() != first[5].load_image().tobytes()
    lengths = {len(s.prompt.split()) for s in first}
    assert min(lengths) <= 3 and max(lengths) >= 15
    assert synthetic_samples(20, seed=4)[0].key != first[0].key
    with pytest.raises(CalibrationDataError):
        synthetic_samples(0)
