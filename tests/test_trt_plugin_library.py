"""The TensorRT plugin library: compile checks, the CMake build, registry loading, the harness.

What runs where:
- always: `find_plugin_library` errors; with nvcc: every kernel `.cu` compiles for sm_80 and
  sm_90 (they include no TensorRT header), the GPU check program (tests/gpu_check.cu) links
  and, where a CUDA device is present, runs every kernel against the CPU path; CMake's clear
  error without TensorRT headers;
- with TensorRT headers (TENSORRT_ROOT pointing at a folder with include/NvInfer.h, e.g. a
  checkout of github.com/NVIDIA/TensorRT; TensorRT_INCLUDE_DIR; or the 10.14 headers inside an
  installed `kernel-lens` wheel): the CMake build of both library variants, their
  exported symbols and dependencies, and the C++ harness (tests/harness.cpp) on the CPU;
- with the `tensorrt-lean` wheels as well: loading into TensorRT's plugin registry on the
  CPU, every creator with its fields, plugin creation in both phases, the static registrar.
Registry checks run in a subprocess each: a registry crash must not take pytest down.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sparsevlm import trt_plugins
from sparsevlm.trt_plugins import (LIBRARY_NAME, PLUGIN_LIBRARY_ENV, PLUGIN_NAMES, SOURCE_DIR,
                                   STATIC_LIBRARY_NAME, build_plugin_library, find_plugin_library)

KERNEL_SOURCES = sorted(SOURCE_DIR.glob("*/*_kernel.cu"))
FIELD_NAMES = {"TopKTokenSelect": ["k"], "TokenPrune": [], "TokenRecycle": ["candidate_percent", "cluster_divisor"],
               "RankKeepCount": ["rule", "scale", "bias", "lam"]}


def _nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found is None and Path("/usr/local/cuda/bin/nvcc").is_file():
        found = "/usr/local/cuda/bin/nvcc"
    return found


def _wheel_headers() -> str | None:
    """TensorRT 10.x headers vendored by the `kernel-lens` wheel (pip install --no-deps
    kernel-lens), located without importing the package (it would import torch and triton)."""
    spec = importlib.util.find_spec("kernel_lens")
    if spec is None or not spec.submodule_search_locations:
        return None
    return str(Path(list(spec.submodule_search_locations)[0]) / "include" / "tensorrt")


def _tensorrt_include() -> Path | None:
    """The TensorRT header folder: $TensorRT_INCLUDE_DIR, else $TENSORRT_ROOT/include, else the
    headers of an installed kernel-lens wheel."""
    for folder in (os.environ.get("TensorRT_INCLUDE_DIR"), os.environ.get("TENSORRT_ROOT") and
                   str(Path(os.environ["TENSORRT_ROOT"]) / "include"), _wheel_headers()):
        if folder and (Path(folder) / "NvInfer.h").is_file():
            return Path(folder)
    return None


def _lean_library() -> Path | None:
    """libnvinfer_lean.so.* from the tensorrt-lean-*-libs wheel, when installed."""
    try:
        import tensorrt_lean_libs
    except ImportError:
        return None
    found = sorted(Path(list(tensorrt_lean_libs.__path__)[0]).glob("libnvinfer_lean.so*"))
    return found[0] if found else None


def _lean_bindings_installed() -> bool:
    try:
        import tensorrt_lean_bindings  # noqa: F401
    except ImportError:
        return False
    return True


# ---------------------------------------------------------------------------------------------
# Always


def test_find_plugin_library_prefers_argument_then_environment(tmp_path, monkeypatch):
    library = tmp_path / LIBRARY_NAME
    library.write_bytes(b"")
    other = tmp_path / "other.so"
    other.write_bytes(b"")
    monkeypatch.setenv(PLUGIN_LIBRARY_ENV, str(other))
    assert find_plugin_library(library) == library.resolve()
    assert find_plugin_library() == other.resolve()


def test_find_plugin_library_missing_names_what_to_build(tmp_path, monkeypatch):
    monkeypatch.setenv(PLUGIN_LIBRARY_ENV, str(tmp_path / "missing.so"))
    with pytest.raises(FileNotFoundError, match=r"\$SPARSEVLM_PLUGIN_LIB.*build_plugin_library"):
        find_plugin_library()
    monkeypatch.delenv(PLUGIN_LIBRARY_ENV)
    monkeypatch.setattr(trt_plugins, "DEFAULT_BUILD_DIR", tmp_path / "build")
    with pytest.raises(FileNotFoundError, match=r"default build folder.*cmake -S"):
        find_plugin_library()


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("source", KERNEL_SOURCES, ids=[p.name for p in KERNEL_SOURCES])
def test_kernel_compiles_with_nvcc(source, arch, tmp_path):
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (PATH or /usr/local/cuda/bin/nvcc)")
    result = subprocess.run([nvcc, "-c", f"-arch={arch}", "-std=c++17", "-Xcompiler=-Wall", str(source),
                             "-o", str(tmp_path / "kernel.o")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "kernel.o").stat().st_size > 0


def test_kernels_on_the_gpu_match_the_cpu_path(tmp_path):
    """trt_plugins/tests/gpu_check.cu runs every launcher on the GPU against runOnHost (float32
    and float16). It compiles and links wherever nvcc is; it runs where a CUDA device is."""
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (PATH or /usr/local/cuda/bin/nvcc)")
    program = tmp_path / "gpu_check"
    # -arch=sm_80 embeds sm_80 code and compute_80 PTX, which newer GPUs compile at load time.
    subprocess.run([nvcc, "-std=c++17", "-arch=sm_80", str(SOURCE_DIR / "tests" / "gpu_check.cu"),
                    *map(str, KERNEL_SOURCES), "-o", str(program)], check=True, capture_output=True)
    result = subprocess.run([str(program)], capture_output=True, text=True, timeout=300)
    if result.returncode == 77:
        pytest.skip("no CUDA device: the kernels were compiled and linked but not run")
    summary = re.search(r"gpu_check: (\d+) checks, (\d+) failed", result.stdout)
    assert result.returncode == 0 and summary and summary.group(2) == "0", result.stdout + result.stderr
    assert int(summary.group(1)) >= 60


def test_four_kernel_sources():
    assert sorted(p.parent.name for p in KERNEL_SOURCES) == sorted(PLUGIN_NAMES)


def test_build_without_headers_says_what_is_missing(tmp_path, monkeypatch):
    if shutil.which("cmake") is None or _nvcc() is None:
        pytest.skip("needs cmake and nvcc to configure the CUDA project")
    monkeypatch.delenv("TENSORRT_ROOT", raising=False)
    monkeypatch.delenv("TensorRT_INCLUDE_DIR", raising=False)
    monkeypatch.setenv("PATH", str(Path(_nvcc()).parent) + os.pathsep + os.environ.get("PATH", ""))
    with pytest.raises(RuntimeError, match=r"(?s)TensorRT headers \(NvInfer.h\) not found.*TENSORRT_ROOT"):
        build_plugin_library(tmp_path / "build", tmp_path / "nothing")


# ---------------------------------------------------------------------------------------------
# With TensorRT headers


# The build folder, once per session: tests/test_trt_plugin_parity.py imports `built` too, and
# pytest gives an imported module-scoped fixture one instance per module (see export_helpers.py).
_BUILT: list[Path] = []


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    if _BUILT:
        return _BUILT[0]
    include = _tensorrt_include()
    if include is None:
        pytest.skip("TensorRT headers not available: set TENSORRT_ROOT to a folder with include/NvInfer.h "
                    "(e.g. a checkout of github.com/NVIDIA/TensorRT), TensorRT_INCLUDE_DIR to the folder, "
                    "or pip install --no-deps kernel-lens (ships TensorRT 10.14 headers)")
    if shutil.which("cmake") is None or _nvcc() is None:
        pytest.skip("needs cmake and nvcc to build the plugin library")
    build_dir = tmp_path_factory.mktemp("plugin_build")
    # One architecture keeps the build short; the nvcc tests above cover sm_80 and sm_90.
    library = build_plugin_library(build_dir, include_dir=include, registry_library=_lean_library(),
                                   cuda_architectures="80")
    assert library == build_dir / LIBRARY_NAME and library.is_file()
    assert (build_dir / STATIC_LIBRARY_NAME).is_file()
    _BUILT.append(build_dir)
    return build_dir


def _dynamic_symbols(library: Path) -> set[str]:
    output = subprocess.run(["nm", "-D", "--defined-only", str(library)], capture_output=True, text=True,
                            check=True).stdout
    return {line.split()[-1] for line in output.splitlines() if line.strip()}


def _needed(library: Path) -> list[str]:
    output = subprocess.run(["readelf", "-d", str(library)], capture_output=True, text=True, check=True).stdout
    return re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", output)


def test_dynamic_variant_exports_only_the_entry_points(built):
    if shutil.which("nm") is None or shutil.which("readelf") is None:
        pytest.skip("binutils (nm, readelf) not on PATH")
    library = built / LIBRARY_NAME
    assert _dynamic_symbols(library) == {"getCreators", "setLoggerFinder"}
    needed = _needed(library)
    assert not [n for n in needed if "nvinfer" in n or "cudart" in n], needed  # static cudart, no libnvinfer


def test_static_variant_registers_instead_of_exporting(built):
    if shutil.which("nm") is None:
        pytest.skip("binutils (nm) not on PATH")
    assert "getCreators" not in _dynamic_symbols(built / STATIC_LIBRARY_NAME)


def test_cpu_harness_passes(built):
    result = subprocess.run([str(built / "sparsevlm_plugin_harness"), str(built / LIBRARY_NAME)],
                            capture_output=True, text=True, timeout=120)
    summary = re.search(r"harness: (\d+) checks, (\d+) failed", result.stdout)
    assert summary, result.stdout + result.stderr
    failures = [line for line in result.stdout.splitlines() if line.startswith("FAIL")]
    assert result.returncode == 0 and summary.group(2) == "0", failures
    assert int(summary.group(1)) >= 500  # every op, both phases, clone: a few hundred checks


# ---------------------------------------------------------------------------------------------
# With TensorRT headers and the lean runtime wheels

REGISTRY_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    import tensorrt_lean_bindings as trt

    F = trt.PluginField
    T = trt.PluginFieldType
    GOOD = {
        "TopKTokenSelect": [F("k", np.array([3], np.int32), T.INT32)],
        "TokenPrune": [],
        "TokenRecycle": [F("candidate_percent", np.array([30], np.int32), T.INT32),
                         F("cluster_divisor", np.array([10], np.int32), T.INT32)],
        "RankKeepCount": [F("rule", np.frombuffer(b"paper", np.int8), T.CHAR),
                          F("lam", np.array([0.5], np.float32), T.FLOAT32)],
    }
    BAD = {
        "TopKTokenSelect": [],
        "TokenRecycle": [F("cluster_divisor", np.array([1], np.int32), T.INT32)],
        "RankKeepCount": [F("rule", np.frombuffer(b"v9", np.int8), T.CHAR)],
    }
    registry = trt.get_plugin_registry()
    before = len(registry.all_creators)
    handle = registry.load_library(sys.argv[1])
    report = {"loaded": handle is not None, "added": len(registry.all_creators) - before, "ops": {}}
    for name, fields in GOOD.items():
        creator = registry.get_creator(name, "1", "sparsevlm")
        if creator is None:
            report["ops"][name] = None
            continue
        op = {"kind": creator.interface_info.kind, "fields": [f.name for f in creator.field_names]}
        for phase in ("BUILD", "RUNTIME"):
            plugin = creator.create_plugin(name, trt.PluginFieldCollection(fields), getattr(trt.TensorRTPhase, phase))
            core = plugin.get_capability_interface(trt.PluginCapabilityType.CORE) if plugin else None
            build = plugin.get_capability_interface(trt.PluginCapabilityType.BUILD) if plugin else None
            op[phase] = None if plugin is None else [core.plugin_name, core.plugin_namespace, core.plugin_version,
                                                      build.num_outputs]
            del plugin, core, build
        if name in BAD:
            bad = creator.create_plugin(name, trt.PluginFieldCollection(BAD[name]), trt.TensorRTPhase.BUILD)
            op["bad_rejected"] = bad is None
            del bad
        report["ops"][name] = op
    registry.deregister_library(handle)
    report["after_deregister"] = registry.get_creator("TopKTokenSelect", "1", "sparsevlm") is not None
    print(json.dumps(report))
""")

STATIC_SCRIPT = textwrap.dedent("""
    import ctypes, json, sys
    import tensorrt_lean_bindings as trt  # loads libnvinfer_lean, which the static variant links

    registry = trt.get_plugin_registry()
    before = [registry.get_creator(n, "1", "sparsevlm") is not None for n in sys.argv[2:]]
    ctypes.CDLL(sys.argv[1])
    after = [registry.get_creator(n, "1", "sparsevlm") is not None for n in sys.argv[2:]]
    empty_namespace = [registry.get_creator(n, "1", "") is not None for n in sys.argv[2:]]
    print(json.dumps({"before": before, "after": after, "empty_namespace": empty_namespace}))
""")

NUM_OUTPUTS = {"TopKTokenSelect": 2, "TokenPrune": 3, "TokenRecycle": 2, "RankKeepCount": 2}


@pytest.fixture(scope="module")
def lean(built) -> Path:
    if not _lean_bindings_installed():
        pytest.skip("tensorrt-lean wheels not installed (pip install tensorrt-lean-cu13-libs "
                    "tensorrt-lean-cu13-bindings)")
    return built


def _run_json(script: str, *args: str) -> dict:
    result = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_lean_registry_loads_every_creator(lean):
    report = _run_json(REGISTRY_SCRIPT, str(lean / LIBRARY_NAME))
    assert report["loaded"] and report["added"] == 4
    for name in PLUGIN_NAMES:
        op = report["ops"][name]
        assert op is not None, f"{name} not found in namespace sparsevlm"
        assert op["kind"] == "PLUGIN CREATOR_V3ONE"
        assert op["fields"] == FIELD_NAMES[name]
        for phase in ("BUILD", "RUNTIME"):
            assert op[phase] == [name, "sparsevlm", "1", NUM_OUTPUTS[name]], (name, phase)
        assert op.get("bad_rejected", True), f"{name} accepted bad attributes"
    assert report["after_deregister"] is False


def _header_major() -> int:
    text = (_tensorrt_include() / "NvInferVersion.h").read_text()
    return int(re.search(r"#define TRT_MAJOR_ENTERPRISE (\d+)", text).group(1))


def test_static_variant_registers_in_sparsevlm_namespace(lean):
    if _lean_library() is None:
        pytest.skip("libnvinfer_lean not found in the tensorrt_lean_libs wheel")
    import tensorrt_lean_bindings

    report = _run_json(STATIC_SCRIPT, str(lean / STATIC_LIBRARY_NAME), *PLUGIN_NAMES)
    if _header_major() == int(tensorrt_lean_bindings.__version__.split(".")[0]):
        assert report == {"before": [False] * 4, "after": [True] * 4, "empty_namespace": [False] * 4}
    else:
        # Other major version: the registrar must refuse (its registry vtable differs) instead of crashing.
        assert report == {"before": [False] * 4, "after": [False] * 4, "empty_namespace": [False] * 4}


# Build, then run, in one process, and two pipelines side by side: the lean runtime's registry
# returns None for a library it already holds, which the shared loader must not take for a
# failure. The executors use the real registry and fake engines (tests/test_trt_executor.py).
DOUBLE_LOAD_SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import tensorrt_lean_bindings as lean
    from sparsevlm import trt_plugins
    from sparsevlm.export import trt_build
    from sparsevlm.runtime.backends import TensorRTExecutor
    sys.path.insert(0, sys.argv[4])
    from test_trt_executor import RecordingOrder, fake_artifact, fake_engines, fake_tensorrt

    library, broken, scratch = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    registry = lean.get_plugin_registry()
    report = {}
    try:
        trt_plugins.load_plugin_library(registry, broken)
        report["broken"] = "loaded"
    except trt_plugins.PluginLibraryError as error:
        report["broken"] = str(error)
    report["build"] = str(trt_build.load_plugin_library(lean, library))
    report["registry_second_load"] = repr(registry.load_library(library))
    log = []
    trt = fake_tensorrt(fake_engines(log), registry, log)
    artifact = fake_artifact(scratch)
    pipelines = [TensorRTExecutor(artifact, library, tensorrt=trt, device="cpu", stream_order=RecordingOrder(log))
                 for _ in range(2)]
    report["pipelines"] = len(pipelines)
    report["creators"] = [registry.get_creator(n, "1", "sparsevlm") is not None for n in trt_plugins.PLUGIN_NAMES]
    print(json.dumps(report))
""")

OTHER_CODE_FIRST_SCRIPT = textwrap.dedent("""
    import json, sys
    import tensorrt_lean_bindings as lean
    from sparsevlm.export import trt_build

    registry = lean.get_plugin_registry()
    first = registry.load_library(sys.argv[1])  # e.g. the user's own code, before sparsevlm-build
    print(json.dumps({"first": first is not None, "build": str(trt_build.load_plugin_library(lean, sys.argv[1]))}))
""")


def test_lean_registry_second_load_is_not_a_failure(lean, tmp_path):
    library = str(lean / LIBRARY_NAME)
    broken = tmp_path / "libbroken.so"
    broken.write_bytes(b"\x7fELF not really")
    report = _run_json(DOUBLE_LOAD_SCRIPT, library, str(broken), str(tmp_path / "artifact"),
                       str(Path(__file__).parent))
    assert report["broken"].startswith(f"TensorRT could not load the plugin library {broken}: the registry still "
                                       "lacks TopKTokenSelect, TokenPrune, TokenRecycle, RankKeepCount")
    assert report["build"] == library
    assert report["registry_second_load"] == "None"  # what the registry answers a second load
    assert report["pipelines"] == 2 and report["creators"] == [True] * 4


def test_lean_registry_library_loaded_by_other_code_is_accepted(lean):
    library = str(lean / LIBRARY_NAME)
    assert _run_json(OTHER_CODE_FIRST_SCRIPT, library) == {"first": True, "build": library}
