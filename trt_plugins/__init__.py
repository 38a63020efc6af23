"""sparsevlm.trt_plugins: find or build the TensorRT plugin library of the `sparsevlm` ops.

The C++/CUDA sources live next to this file (one folder per op, see README.md). This module
locates the built library, loads it into a TensorRT plugin registry (the one loader that the
engine builder and the runtime share) and runs CMake:

    from sparsevlm.trt_plugins import build_plugin_library, find_plugin_library, load_plugin_library
    build_plugin_library(tensorrt_root="/opt/TensorRT")   # once; needs nvcc and TensorRT headers
    path = find_plugin_library()                          # $SPARSEVLM_PLUGIN_LIB, else the build dir
    load_plugin_library(trt.get_plugin_registry())        # idempotent per registry and process
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
from pathlib import Path

PLUGIN_NAMESPACE = "sparsevlm"
PLUGIN_VERSION = "1"
PLUGIN_NAMES = ("TopKTokenSelect", "TokenPrune", "TokenRecycle", "RankKeepCount")

PLUGIN_LIBRARY_ENV = "SPARSEVLM_PLUGIN_LIB"
SOURCE_DIR = Path(__file__).resolve().parent
DEFAULT_BUILD_DIR = SOURCE_DIR / "build"
# For IPluginRegistry.load_library / trtexec --dynamicPlugins / the lean runtime.
LIBRARY_NAME = "libsparsevlm_plugins.so"
# Registers itself when loaded: Triton's `plugins=` option or LD_PRELOAD. Never load_library it.
STATIC_LIBRARY_NAME = "libsparsevlm_plugins_static.so"

_BUILD_HINT = (f"build it with sparsevlm.trt_plugins.build_plugin_library(tensorrt_root=...) or "
               f"`cmake -S {SOURCE_DIR} -B {DEFAULT_BUILD_DIR} -DTENSORRT_ROOT=<TensorRT headers> && "
               f"cmake --build {DEFAULT_BUILD_DIR}`, or point {PLUGIN_LIBRARY_ENV} at a built {LIBRARY_NAME}")


def find_plugin_library(path: str | os.PathLike | None = None) -> Path:
    """The plugin library to load: `path` if given, else $SPARSEVLM_PLUGIN_LIB, else the
    default build folder. Raises FileNotFoundError naming what to build when it is missing."""
    if path is not None:
        where = Path(path)
        source = "the given path"
    elif os.environ.get(PLUGIN_LIBRARY_ENV):
        where = Path(os.environ[PLUGIN_LIBRARY_ENV])
        source = f"${PLUGIN_LIBRARY_ENV}"
    else:
        where = DEFAULT_BUILD_DIR / LIBRARY_NAME
        source = "the default build folder"
    if not where.is_file():
        raise FileNotFoundError(f"TensorRT plugin library not found at {where} ({source}); {_BUILD_HINT}")
    return where.resolve()


class PluginLibraryError(RuntimeError):
    """A TensorRT plugin registry cannot load the plugin library."""


# (id(registry), library) -> (registry, handle) for every library this process loaded. The
# registry object is kept so that its id cannot be reused by another object.
_loaded: dict[tuple[int, Path], tuple[object, object]] = {}
_loaded_lock = threading.Lock()


def load_plugin_library(registry, path: str | os.PathLike | None = None) -> Path:
    """Load libsparsevlm_plugins.so (`find_plugin_library(path)`) into `registry`: TensorRT's
    `get_plugin_registry()`, or a loaded lean runtime's `runtime.get_plugin_registry()`.

    `IPluginRegistry.load_library` returns None for a library that registry already holds, so
    a second load in one process (an engine build then a pipeline, two pipelines side by side)
    must not count as a failure: each (registry, library) is loaded once and remembered, and a
    None from the registry is accepted when the registry already has every `sparsevlm` creator
    (loaded by other code, e.g. the static-registration variant). Returns the library's path;
    raises FileNotFoundError when it is missing and PluginLibraryError when it cannot be loaded.
    """
    library = find_plugin_library(path)
    key = (id(registry), library)
    with _loaded_lock:
        if key in _loaded:
            return library
        handle = registry.load_library(str(library))
        if handle is None:
            missing = [name for name in PLUGIN_NAMES
                       if registry.get_creator(name, PLUGIN_VERSION, PLUGIN_NAMESPACE) is None]
            if missing:
                raise PluginLibraryError(
                    f"TensorRT could not load the plugin library {library}: the registry still lacks "
                    f"{', '.join(missing)} (namespace {PLUGIN_NAMESPACE!r}); is it built against this TensorRT "
                    f"major version, and is it {LIBRARY_NAME} (getCreators), not {STATIC_LIBRARY_NAME}?")
        _loaded[key] = (registry, handle)
    return library


def build_plugin_library(build_dir: str | os.PathLike | None = None,
                         tensorrt_root: str | os.PathLike | None = None, *,
                         include_dir: str | os.PathLike | None = None,
                         registry_library: str | os.PathLike | None = None,
                         cuda_architectures: str | None = None,
                         harness: bool = True, jobs: int | None = None) -> Path:
    """Configure and build the plugin libraries with CMake; returns the path of
    libsparsevlm_plugins.so (libsparsevlm_plugins_static.so is built next to it).

    tensorrt_root: a TensorRT install or NVIDIA/TensorRT checkout (defaults to $TENSORRT_ROOT).
    include_dir: the folder holding NvInfer.h, when it is not TENSORRT_ROOT/include.
    registry_library: libnvinfer(_lean).so.* the static-registration variant links against.
    cuda_architectures: CMAKE_CUDA_ARCHITECTURES, e.g. "80;90" (the default).
    Raises FileNotFoundError when cmake is missing, RuntimeError (with CMake's output) when
    configuring or building fails, e.g. because the TensorRT headers cannot be found.
    """
    if not (SOURCE_DIR / "CMakeLists.txt").is_file():
        raise FileNotFoundError(f"the plugin sources are not next to {__file__} (a wheel without them?); "
                                "build from a source checkout of sparsevlm-trt")
    cmake = shutil.which("cmake")
    if cmake is None:
        raise FileNotFoundError("cmake is not on PATH; it is needed to build the TensorRT plugin library")
    build = Path(build_dir) if build_dir is not None else DEFAULT_BUILD_DIR
    configure = [cmake, "-S", str(SOURCE_DIR), "-B", str(build),
                 f"-DSPARSEVLM_BUILD_HARNESS={'ON' if harness else 'OFF'}"]
    if tensorrt_root is not None:
        configure.append(f"-DTENSORRT_ROOT={Path(tensorrt_root).resolve()}")
    if include_dir is not None:
        configure.append(f"-DTensorRT_INCLUDE_DIR={Path(include_dir).resolve()}")
    if registry_library is not None:
        configure.append(f"-DSPARSEVLM_REGISTRY_LIBRARY={Path(registry_library).resolve()}")
    if cuda_architectures is not None:
        configure.append(f"-DCMAKE_CUDA_ARCHITECTURES={cuda_architectures}")
    compile_all = [cmake, "--build", str(build), "--parallel", str(jobs or os.cpu_count() or 1)]
    for step in (configure, compile_all):
        result = subprocess.run(step, capture_output=True, text=True)
        if result.returncode != 0:
            output = (result.stdout + result.stderr)[-4000:]
            raise RuntimeError(f"building the TensorRT plugin library failed: {' '.join(step)}\n{output}")
    return build / LIBRARY_NAME
