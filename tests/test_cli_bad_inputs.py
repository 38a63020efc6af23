"""Bad inputs as users really have them, through the installed commands (subprocesses).

Every user-caused failure must end with exit status 2, no traceback, a last stderr line
`<command>: error: ...` naming the input, and nothing lost or half-written (the user's files
still there, no partial artifact). Each defect is reproduced through the installed command
in a subprocess; further variants of the same defect call the same `main` in process
(`in_process`), which goes through the same failure wrapper, to keep the suite fast (a
subprocess pays torch's import). Most cases fail before any model loads; the cases that need
a real export use the fastest method (FasterVLM: three graphs).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from export_helpers import artifact_root, artifacts  # noqa: F401

# A location nobody can write, root included (permission bits would not stop root).
UNWRITABLE = Path("/proc/sparsevlm-no-such-dir")
# The commands as pyproject.toml defines them ("module:function"), read from the source tree so
# the tests run this checkout's commands even when the installed scripts are older.
SCRIPTS = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]["scripts"]


def command_argv(command: str) -> list[str]:
    """What the installed console script runs: import the entry point and exit with its status."""
    module, function = SCRIPTS[command].split(":")
    return [sys.executable, "-c", f"import sys; from {module} import {function}; sys.exit({function}())"]


def cli(command: str, *args, cwd=None, umask: int | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([*command_argv(command), *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout, preexec_fn=None if umask is None else (lambda: os.umask(umask)))


def in_process(command: str, *args, capsys) -> subprocess.CompletedProcess:
    """The command's `main` called here (same wrapper as the installed script), as a CompletedProcess."""
    import importlib
    capsys.readouterr()
    module, function = SCRIPTS[command].split(":")
    code = getattr(importlib.import_module(module), function)(list(map(str, args)))
    captured = capsys.readouterr()
    return subprocess.CompletedProcess([command, *args], code, captured.out, captured.err)


def assert_user_error(result: subprocess.CompletedProcess, command: str, *names: str) -> str:
    """Exit 2, no traceback, and the last stderr line is the command's error naming `names`."""
    output = result.stdout + result.stderr
    assert "Traceback" not in output, output[-3000:]
    assert result.returncode == 2, (result.returncode, output[-3000:])
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"{command}: error:"), last
    for name in names:
        assert name in last, (name, last)
    return last


def no_partial_outputs(parent: Path) -> None:
    leftovers = [p.name for p in parent.iterdir() if p.name.startswith(".") and ".partial-" in p.name]
    assert not leftovers, leftovers
    assert not list(parent.glob(".*.lock")), list(parent.glob(".*.lock"))


# ------------------------------------------------------------------------------------------
# Checkpoints as users have them
# ------------------------------------------------------------------------------------------

def _edited_checkpoint(demo_dir: Path, target: Path, config_edit=None, weights_edit=None) -> Path:
    shutil.copytree(demo_dir, target)
    if config_edit is not None:
        config = json.loads((target / "config.json").read_text())
        config_edit(config)
        (target / "config.json").write_text(json.dumps(config))
    if weights_edit is not None:
        from safetensors.torch import load_file, save_file
        weights = load_file(target / "model.safetensors")
        weights_edit(weights)
        save_file(weights, target / "model.safetensors", metadata={"format": "pt"})
    return target


def _drop_pad(config: dict, keep_in_text_config: bool = False) -> None:
    config.pop("pad_token_id", None)
    if not keep_in_text_config:
        config["text_config"].pop("pad_token_id", None)


@pytest.fixture(scope="module")
def no_pad_checkpoint(demo_dir, tmp_path_factory):
    """The demo checkpoint without any pad_token_id in config.json (fine-tuning scripts drop it)."""
    return _edited_checkpoint(demo_dir, tmp_path_factory.mktemp("ckpt") / "no-pad", _drop_pad)


def test_checkpoint_without_pad_id_exports_runs_and_calibrates(no_pad_checkpoint, tmp_path):
    """Before: AttributeError (config.pad_token_id) in export, calibration and generate."""
    out = tmp_path / "art"
    result = cli("sparsevlm-export", "--model", no_pad_checkpoint, "--method", "fastervlm", "--budget", 64,
                 "--out", out, "--quiet", umask=0o027)
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["pad_token_id"] == 3  # the tokenizer's <pad>, the id the config had held
    # artifact folders get the umask's permissions, not mkdtemp's 0700
    assert stat.S_IMODE(out.stat().st_mode) == 0o750
    assert stat.S_IMODE((out / "weights").stat().st_mode) == 0o750
    assert stat.S_IMODE((out / "manifest.json").stat().st_mode) == 0o640
    no_partial_outputs(tmp_path)

    image = Path(__file__).resolve().parents[1] / "examples" / "shapes.png"
    run = cli("sparsevlm-run", "--artifact", out, "--image", image, "--prompt", "What is in the image?",
              "--max-new-tokens", 2, "--trace-json", tmp_path / "trace.json")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "answer:" in run.stdout and json.loads((tmp_path / "trace.json").read_text())["layers"]

    calib = cli("sparsevlm-calibrate", "--model", no_pad_checkpoint, "--method", "fastv", "--budget", 100,
                "--synthetic", 2, "--out", tmp_path / "calib", "--no-progress")
    assert calib.returncode == 0, calib.stderr[-3000:]
    assert json.loads((tmp_path / "calib" / "calibration.json").read_text())["segments"]


def test_pad_id_resolution_order(demo_dir, tmp_path):
    """Top level, else text_config, else the tokenizer, else the documented fallback; and the
    Python API generates on a checkpoint keeping it only in text_config."""
    from types import SimpleNamespace

    from sparsevlm.methods import SparseLlava, SparseVLMConfig
    from sparsevlm.methods.loading import FALLBACK_PAD_TOKEN_ID, resolve_pad_token_id
    text_only = SimpleNamespace(text_config=SimpleNamespace(pad_token_id=7))
    assert resolve_pad_token_id(SimpleNamespace(pad_token_id=5, text_config=text_only.text_config)) == 5
    assert resolve_pad_token_id(text_only) == 7
    assert resolve_pad_token_id(SimpleNamespace(), SimpleNamespace(pad_token_id=9)) == 9
    assert resolve_pad_token_id(SimpleNamespace(), SimpleNamespace(pad_token_id=None)) == FALLBACK_PAD_TOKEN_ID

    checkpoint = _edited_checkpoint(demo_dir, tmp_path / "text-pad", lambda c: _drop_pad(c, keep_in_text_config=True))
    vlm = SparseLlava.from_pretrained(str(checkpoint), SparseVLMConfig(method="fastv", budget=100))
    assert not hasattr(vlm.model.config, "pad_token_id") or vlm.model.config.pad_token_id is None
    assert vlm.pad_id == 3
    from PIL import Image
    inputs = vlm.prepare([Image.new("RGB", (336, 336), "red")] * 2, ["Color?", "What is in the image? Describe it."])
    out = vlm.generate(**inputs, max_new_tokens=2)  # two prompts of different lengths: padding is used
    assert out.sequences.shape == (2, 2)


@pytest.mark.parametrize("case", ["missing_lm_head", "extra_tensor", "wrong_shape", "truncated", "random_bytes",
                                  "bad_config_json"])
def test_damaged_checkpoint_is_refused_naming_the_problem(case, demo_dir, tmp_path, capsys):
    """Before: a missing lm_head exported with exit 0 and a random head; the others traced back."""
    import torch
    target = tmp_path / "ckpt"
    head = "language_model.lm_head.weight"
    if case == "missing_lm_head":
        _edited_checkpoint(demo_dir, target, weights_edit=lambda w: w.pop(head))
        expected = ["lm_head.weight", "missing"]
    elif case == "extra_tensor":
        _edited_checkpoint(demo_dir, target, weights_edit=lambda w: w.__setitem__("adapter.extra", torch.zeros(3)))
        expected = ["adapter.extra", "unexpected"]
    elif case == "wrong_shape":
        _edited_checkpoint(demo_dir, target, weights_edit=lambda w: w.__setitem__(head, torch.zeros(7, 64)))
        expected = ["lm_head.weight", "wrong shape"]
    elif case in ("truncated", "random_bytes"):
        _edited_checkpoint(demo_dir, target)
        data = (target / "model.safetensors").read_bytes()
        (target / "model.safetensors").write_bytes(data[: len(data) // 2] if case == "truncated" else os.urandom(4096))
        expected = ["model.safetensors", "not a readable safetensors file"]
    else:
        _edited_checkpoint(demo_dir, target)
        (target / "config.json").write_text('{"model_type": "llava", "text_config": {')
        expected = ["config.json", "not valid JSON"]
    out = tmp_path / "art"
    args = ["--model", target, "--method", "fastervlm", "--budget", 64, "--out", out, "--quiet"]
    result = (cli("sparsevlm-export", *args) if case == "missing_lm_head"
              else in_process("sparsevlm-export", *args, capsys=capsys))
    assert_user_error(result, "sparsevlm-export", *expected)
    assert not out.exists()
    no_partial_outputs(tmp_path)


# ------------------------------------------------------------------------------------------
# Output directories: never a user's folder, never two writers
# ------------------------------------------------------------------------------------------

def test_overwrite_refuses_a_users_folder(demo_dir, tmp_path):
    """Before: the folder and the user's file were wiped, exit 0."""
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "thesis.txt").write_text("years of work")
    result = cli("sparsevlm-export", "--model", demo_dir, "--out", folder, "--overwrite", "--quiet")
    assert_user_error(result, "sparsevlm-export", str(folder), "not written by this toolkit")
    assert (folder / "thesis.txt").read_text() == "years of work"
    no_partial_outputs(tmp_path)


def test_overwrite_of_the_current_directory_refused(demo_dir, tmp_path):
    """Before: `--out . --overwrite` emptied the current directory, then crashed."""
    (tmp_path / "keep.txt").write_text("mine")
    result = cli("sparsevlm-export", "--model", demo_dir, "--out", ".", "--overwrite", "--quiet", cwd=tmp_path)
    assert_user_error(result, "sparsevlm-export", "not written by this toolkit")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


def test_a_second_writer_of_the_same_out_fails(demo_dir, tmp_path):
    """Two exports to one --out: the one that finds another writer's lock fails at once
    (before: both succeeded and the later silently replaced the earlier)."""
    from sparsevlm.methods.files import directory_lock
    out = tmp_path / "shared"
    with directory_lock(out.resolve()):  # what a running export holds
        result = cli("sparsevlm-export", "--model", demo_dir, "--method", "fastervlm", "--budget", 64,
                     "--out", out, "--quiet")
    assert_user_error(result, "sparsevlm-export", str(out), "another process is writing")
    assert not out.exists()


def test_atomic_directory_rules(tmp_path):
    """In process: replaces only the toolkit's output or an empty directory, keeps the old
    one when the new one fails, and applies the umask."""
    from sparsevlm.methods.files import OutputDirectoryError, atomic_directory

    def write(out, **kwargs):
        with atomic_directory(out, "partial-", **kwargs) as tmp:
            (tmp / "manifest.json").write_text(json.dumps({"schema": "sparsevlm-artifact/1"}))
            (tmp / "payload").write_text(str(out))

    out = tmp_path / "artifact"
    write(out)
    write(out)  # an artifact is replaced
    assert (out / "payload").read_text() == str(out)
    (tmp_path / "empty").mkdir()
    write(tmp_path / "empty")
    user = tmp_path / "user"
    user.mkdir()
    (user / "file").write_text("x")
    with pytest.raises(OutputDirectoryError, match="not written by this toolkit"):
        write(user)
    assert (user / "file").read_text() == "x"
    with pytest.raises(OutputDirectoryError, match="appeared"):
        write(out, overwrite=False)
    with pytest.raises(KeyboardInterrupt):
        with atomic_directory(out, "partial-") as tmp:
            (tmp / "half").write_text("half")
            raise KeyboardInterrupt
    assert (out / "payload").exists() and not (out / "half").exists()
    # a second writer of the same directory is refused while the first holds it
    with atomic_directory(tmp_path / "busy"):
        with pytest.raises(OutputDirectoryError, match="another process is writing"):
            with atomic_directory(tmp_path / "busy"):
                pass
    previous = os.umask(0o077)
    try:
        write(tmp_path / "private")
    finally:
        os.umask(previous)
    write(tmp_path / "shared")
    assert stat.S_IMODE((tmp_path / "private").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "shared").stat().st_mode) == 0o777 & ~previous
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_unwritable_out_is_refused_before_the_work(demo_dir, tmp_path):
    result = cli("sparsevlm-export", "--model", demo_dir, "--out", UNWRITABLE / "art", "--quiet")
    assert_user_error(result, "sparsevlm-export", str(UNWRITABLE))


def test_ctrl_c_during_export_leaves_nothing_and_exits_130(demo_dir, tmp_path):
    out = tmp_path / "interrupted"
    proc = subprocess.Popen([*command_argv("sparsevlm-export"), "--model", str(demo_dir), "--method", "fastervlm", "--budget", "64",
                             "--out", str(out), "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            # a terminal's Ctrl-C, even when pytest itself runs in the background (which ignores SIGINT)
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None and not list(tmp_path.glob(".interrupted.partial-*")):
            time.sleep(0.02)
        assert proc.poll() is None, "export ended before it could be interrupted"
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "Traceback" not in stdout + stderr, stderr[-3000:]
    assert proc.returncode == 130, (proc.returncode, stderr[-3000:])
    assert stderr.strip().splitlines()[-1] == "sparsevlm-export: interrupted"
    assert not out.exists()
    no_partial_outputs(tmp_path)


# ------------------------------------------------------------------------------------------
# Options that do not apply, or are out of range
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, named", [
    (["--method", "sparsevlm", "--reduction", "0.75"], ["--reduction", "--method sparsevlm"]),
    (["--method", "none", "--budget", "192"], ["--budget", "--method none"]),
    (["--method", "sparsevlm", "--variant", "v1.5", "--scale", "2", "--bias", "1"], ["--scale", "v1.5"]),
    (["--budget", "192", "192"], ["--budget", "192", "more than once"]),
    (["--opset", "21"], ["--opset", "21"]),
    (["--opset", "12"], ["--opset", "12"]),
])
def test_export_option_errors(args, named, tmp_path, capsys):
    """Before: the first three were ignored but recorded in the manifest; the duplicate budget
    failed with a misleading 'already exists' after exporting one; opset 21 traced back."""
    out = tmp_path / "out"
    argv = ["--model", "demo", "--out", out, "--quiet", *args]
    result = (cli("sparsevlm-export", *argv) if "--reduction" in args
              else in_process("sparsevlm-export", *argv, capsys=capsys))
    assert_user_error(result, "sparsevlm-export", *named)
    assert not out.exists()


# ------------------------------------------------------------------------------------------
# Calibration files and options
# ------------------------------------------------------------------------------------------

def _calibration(tmp_path: Path, buckets_by_segment, **fields) -> Path:
    """A calibration.json for the demo's SparseVLM v1.0 budget 192 (four pruned segments)."""
    from sparsevlm.methods import SparseVLMConfig, resolve
    data = {"schema": "sparsevlm-calibration/1", "model": "demo",
            "config_sha256": fields.pop("config_sha256", None),
            "method": resolve(SparseVLMConfig(method="sparsevlm", variant="v1.0", budget=192), 22, 576).config.to_dict(),
            "segments": [{"index": i, "buckets": b} for i, b in enumerate(buckets_by_segment, start=1)], **fields}
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps(data))
    return path


@pytest.fixture(scope="module")
def demo_config_hash(demo_dir):
    from sparsevlm.methods.loading import config_sha256, load_model
    return config_sha256(load_model(str(demo_dir))[0])


@pytest.mark.parametrize("case", ["min_above_max", "empty_buckets", "above_visual_count", "another_model",
                                  "not_json"])
def test_bad_calibration_file_refused(case, demo_dir, demo_config_hash, tmp_path, capsys):
    """Before: nonsense buckets were accepted (every request then failed), empty ones crashed,
    a file from another model was taken silently."""
    good = [[[1, 100, 200], [201, 300, 576]]] * 4
    if case == "min_above_max":
        path = _calibration(tmp_path, [[[300, 200, 100]]] + good[1:], config_sha256=demo_config_hash)
        named = ["segments[0].buckets[0]", "min <= opt <= max"]
    elif case == "empty_buckets":
        path = _calibration(tmp_path, [[]] + good[1:], config_sha256=demo_config_hash)
        named = ["no buckets"]
    elif case == "above_visual_count":
        path = _calibration(tmp_path, [[[1, 300, 900]]] + good[1:], config_sha256=demo_config_hash)
        named = ["[1, 300, 900]", "576"]
    elif case == "another_model":
        path = _calibration(tmp_path, good, config_sha256="0" * 64)
        named = ["another model"]
    else:
        path = tmp_path / "calibration.json"
        path.write_text("{\"schema\": ")
        named = ["not valid JSON"]
    out = tmp_path / "out"
    args = ["--model", demo_dir, "--variant", "v1.0", "--budget", 192, "--calibration", path, "--out", out, "--quiet"]
    result = (cli("sparsevlm-export", *args) if case == "another_model"
              else in_process("sparsevlm-export", *args, capsys=capsys))
    assert_user_error(result, "sparsevlm-export", str(path), *named)
    assert not out.exists()
    no_partial_outputs(tmp_path)


def test_calibrate_bounds_max_profiles(demo_dir, tmp_path):
    """Before: --max-profiles 10000000 sized the search tables by the option (minutes, GBs)."""
    result = cli("sparsevlm-calibrate", "--model", demo_dir, "--variant", "v1.0", "--budget", 192,
                 "--synthetic", 2, "--max-profiles", 10000000, "--out", tmp_path / "c", "--no-progress")
    assert_user_error(result, "sparsevlm-calibrate", "max_profiles", "10000000", "576")


def test_calibrate_unwritable_out_refused_before_the_work(demo_dir):
    """Before: the run finished, then writing calibration.json traced back."""
    result = cli("sparsevlm-calibrate", "--model", demo_dir, "--synthetic", 2, "--out", UNWRITABLE, "--no-progress")
    assert_user_error(result, "sparsevlm-calibrate", str(UNWRITABLE))


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_calibrate_cuda_without_gpu(demo_dir, tmp_path, capsys):
    result = in_process("sparsevlm-calibrate", "--model", demo_dir, "--synthetic", 2, "--out", tmp_path / "c",
                        "--device", "cuda", capsys=capsys)
    assert_user_error(result, "sparsevlm-calibrate", "'cuda'", "GPU")


def test_calibrate_option_that_does_not_apply(demo_dir, tmp_path, capsys):
    result = in_process("sparsevlm-calibrate", "--model", demo_dir, "--variant", "v1.5", "--budget", 192,
                        "--scale", 3, "--synthetic", 2, "--out", tmp_path / "c", capsys=capsys)
    assert_user_error(result, "sparsevlm-calibrate", "--scale", "v1.5")
    assert not (tmp_path / "c").exists()


# ------------------------------------------------------------------------------------------
# Artifacts as users have them: sparsevlm-run, sparsevlm-build, sparsevlm-triton
# ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def artifact(artifacts):  # noqa: F811 - the session's cached API export
    return artifacts("sparsevlm_v15_b192")


def _copy_with_manifest(artifact: Path, target: Path, edit) -> Path:
    shutil.copytree(artifact, target)
    manifest = json.loads((target / "manifest.json").read_text())
    (target / "manifest.json").write_text(json.dumps(edit(manifest)))
    return target


@pytest.mark.parametrize("case", ["list", "extra_method_field", "missing_model_field"])
def test_run_with_a_misshapen_manifest(case, artifact, tmp_path, capsys):
    """Before: AttributeError / TypeError / KeyError tracebacks."""
    edits = {"list": lambda m: [m], "extra_method_field": lambda m: {**m, "method": {**m["method"], "alpha": 1}},
             "missing_model_field": lambda m: {**m, "model": {k: v for k, v in m["model"].items() if k != "num_visual"}}}
    named = {"list": "expected an object", "extra_method_field": "alpha", "missing_model_field": "model.num_visual"}
    broken = _copy_with_manifest(artifact, tmp_path / "art", edits[case])
    image = Path(__file__).resolve().parents[1] / "examples" / "shapes.png"
    args = ["--artifact", broken, "--image", image, "--prompt", "What is it?"]
    result = cli("sparsevlm-run", *args) if case == "extra_method_field" else in_process("sparsevlm-run", *args, capsys=capsys)
    assert_user_error(result, "sparsevlm-run", "manifest.json", named[case])


@pytest.mark.parametrize("case", ["trace_json_unwritable", "cuda_without_gpu"])
def test_run_checks_before_the_work(case, artifact, tmp_path, capsys):
    """Before: the trace file failed only after the whole run; --device cuda traced back."""
    import torch
    if case == "cuda_without_gpu" and torch.cuda.is_available():
        pytest.skip("needs a machine without a CUDA GPU")
    image = Path(__file__).resolve().parents[1] / "examples" / "shapes.png"
    extra = (["--trace-json", UNWRITABLE / "t.json"] if case == "trace_json_unwritable"
             else ["--backend", "torch", "--device", "cuda"])
    args = ["--artifact", artifact, "--image", image, "--prompt", "What is it?", *extra]
    result = cli("sparsevlm-run", *args) if case == "trace_json_unwritable" else in_process("sparsevlm-run", *args, capsys=capsys)
    last = assert_user_error(result, "sparsevlm-run")
    assert (str(UNWRITABLE) in last) if case == "trace_json_unwritable" else ("'cuda'" in last)
    assert "answer:" not in result.stdout  # refused before the run, not after it


def test_build_and_triton_report_one_line(tmp_path):
    """sparsevlm-build and sparsevlm-triton go through the same wrapper: a missing artifact
    (`--artifact DIR`, the spelling of every command) is one line naming it, exit status 2 (the
    triton writer exited 1 before), with no traceback."""
    missing = tmp_path / "no-artifact"
    build = cli("sparsevlm-build", "--artifact", missing, "--dry-run")
    assert_user_error(build, "sparsevlm-build", str(missing))
    triton = cli("sparsevlm-triton", "--artifact", missing, "--out", tmp_path / "repo")
    assert_user_error(triton, "sparsevlm-triton", str(missing))
    assert not (tmp_path / "repo").exists()


def test_verbose_shows_the_traceback(tmp_path):
    result = cli("sparsevlm-export", "--model", "demo", "--opset", "99", "--out", tmp_path / "o", "--verbose")
    assert result.returncode == 2 and "Traceback" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("sparsevlm-export: error: --opset")
