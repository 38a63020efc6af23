"""The five commands speak one language: the same method flags for sparsevlm-export and
sparsevlm-calibrate (declared once, in sparsevlm.cli), applied the same way; `--artifact DIR`
for every command that reads an artifact; `--verbose` everywhere; exit status 2 for a usage
error. Read from each command's own `--help` and from what its `main` hands to the work."""

from __future__ import annotations

import importlib
import re
import tomllib
from pathlib import Path

import pytest

from sparsevlm.methods import SparseVLMConfig

SCRIPTS = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]["scripts"]
COMMANDS = ("sparsevlm-export", "sparsevlm-calibrate", "sparsevlm-run", "sparsevlm-build", "sparsevlm-triton")
READS_AN_ARTIFACT = ("sparsevlm-run", "sparsevlm-build", "sparsevlm-triton")
# Every flag that chooses or parameterizes a pruning method (methods/config.py's SparseVLMConfig).
METHOD_FLAGS = {"--method", "--budget", "--variant", "--scale", "--bias", "--lam", "--reduction",
                "--fastv-k", "--fastv-r"}


def entry_point(command: str):
    module, function = SCRIPTS[command].split(":")
    return getattr(importlib.import_module(module), function)


def help_text(command: str, capsys, monkeypatch) -> str:
    monkeypatch.setenv("COLUMNS", "200")  # one option per line
    capsys.readouterr()
    assert entry_point(command)(["--help"]) == 0
    return capsys.readouterr().out


def flags_in(text: str) -> set[str]:
    """The options an argparse help lists (each option line starts with its flags)."""
    return set(re.findall(r"^\s+(?:-\w, )?(--[a-z][a-z0-9-]*)", text, flags=re.MULTILINE))


def section(text: str, title: str) -> str:
    """The lines of one argument group of an argparse help (`title:` up to the next group)."""
    match = re.search(rf"^{re.escape(title)}:\n(.*?)(?=^\S.*:\n|\Z)", text, flags=re.MULTILINE | re.DOTALL)
    assert match, f"no '{title}:' group in\n{text}"
    return match.group(1)


def test_export_and_calibrate_list_the_same_method_flags(capsys, monkeypatch):
    export_help = help_text("sparsevlm-export", capsys, monkeypatch)
    calibrate_help = help_text("sparsevlm-calibrate", capsys, monkeypatch)
    assert flags_in(export_help) & METHOD_FLAGS == flags_in(calibrate_help) & METHOD_FLAGS == METHOD_FLAGS
    export_group, calibrate_group = section(export_help, "method"), section(calibrate_help, "method")
    assert flags_in(export_group) == flags_in(calibrate_group) == METHOD_FLAGS


def test_every_command_has_verbose_and_reads_an_artifact_as_artifact_dir(capsys, monkeypatch):
    for command in COMMANDS:
        text = help_text(command, capsys, monkeypatch)
        assert "--verbose" in flags_in(text), command
        if command in READS_AN_ARTIFACT:
            assert re.search(r"^\s+--artifact DIR\b", text, flags=re.MULTILINE), (command, text)
            assert not re.search(r"^positional arguments:", text, flags=re.MULTILINE), (command, text)


@pytest.mark.parametrize("command", COMMANDS)
def test_a_usage_error_exits_2(command, capsys):
    assert entry_point(command)(["--no-such-option"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"{command}: error: ")


class _Stop(Exception):
    """Raised by the stand-in for the heavy work: the command has built its configs."""


def export_configs(monkeypatch, tmp_path, flags: list[str]) -> list[SparseVLMConfig]:
    """The SparseVLMConfigs sparsevlm-export builds for `flags` (it stops before loading the model)."""
    from sparsevlm.export import exporter
    built = []

    def recording_config(**fields):
        built.append(SparseVLMConfig(**fields))
        return built[-1]

    def no_model(*args, **kwargs):
        raise _Stop()

    monkeypatch.setattr(exporter, "SparseVLMConfig", recording_config)
    monkeypatch.setattr(exporter, "load_model", no_model)
    assert exporter.main(["--model", "demo", "--out", str(tmp_path / "export"), "--quiet", *flags]) == 1  # _Stop
    return built


def calibrate_config(monkeypatch, tmp_path, flags: list[str]) -> SparseVLMConfig:
    """The SparseVLMConfig sparsevlm-calibrate hands to the calibration run for `flags`."""
    from sparsevlm.calibration import cli
    handed = []

    def recording_calibrate(model, config, *args, **kwargs):
        handed.append(config)
        raise _Stop()

    monkeypatch.setattr(cli, "calibrate", recording_calibrate)
    assert cli.main(["--model", "demo", "--synthetic", "2", "--out", str(tmp_path / "calib"), "--quiet", *flags]) == 1
    assert len(handed) == 1
    return handed[0]


# flags -> the config they mean, written out by hand from SparseVLMConfig's fields
CASES = {
    "defaults": ([], SparseVLMConfig(method="sparsevlm", budget=192)),
    "sparsevlm paper, default budget": (["--variant", "paper", "--lam", "0.7"],
                                        SparseVLMConfig(method="sparsevlm", variant="paper", lam=0.7, budget=192)),
    "fastervlm reduction": (["--method", "fastervlm", "--reduction", "0.9"],
                            SparseVLMConfig(method="fastervlm", reduction=0.9)),
    "fastv K and R": (["--method", "fastv", "--fastv-k", "3", "--fastv-r", "0.5"],
                      SparseVLMConfig(method="fastv", K=3, R=0.5)),
    "fastv budget": (["--method", "fastv", "--budget", "100"], SparseVLMConfig(method="fastv", budget=100, K=2)),
    "sparsevlm v1.0 rank rule": (["--variant", "v1.0", "--scale", "2.5", "--bias", "1", "--budget", "128"],
                                 SparseVLMConfig(method="sparsevlm", variant="v1.0", scale=2.5, bias=1.0, budget=128)),
    "sparsevlm paper": (["--variant", "paper", "--lam", "0.7", "--budget", "64"],
                        SparseVLMConfig(method="sparsevlm", variant="paper", lam=0.7, budget=64)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_calibrate_applies_the_method_flags_as_export_does(case, monkeypatch, tmp_path, capsys):
    flags, expected = CASES[case]
    assert export_configs(monkeypatch, tmp_path, flags) == [expected]
    assert calibrate_config(monkeypatch, tmp_path, flags) == expected


@pytest.mark.parametrize("command", ["sparsevlm-export", "sparsevlm-calibrate"])
def test_an_option_the_method_does_not_use_is_refused_by_both(command, tmp_path, capsys):
    source = ["--synthetic", "2"] if command == "sparsevlm-calibrate" else []
    code = entry_point(command)(["--model", "demo", *source, "--out", str(tmp_path / "o"), "--fastv-k", "3"])
    assert code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"{command}: error: --fastv-k: does not apply to --method sparsevlm"), last
    assert not (tmp_path / "o").exists()
