"""Writing a Triton Inference Server model repository for an artifact (`sparsevlm-triton`).

Two flavours (README.md in this folder is the deployment guide):

python    (default) Python-backend models that run `sparsevlm.runtime.Pipeline` in-process:
          `<name>` (request/response, dynamic batching) and `<name>_stream` (decoupled: one
          response per generated token). onnxruntime on CPU, tensorrt where a GPU and engines
          exist (`--backend auto`).
tensorrt  one `tensorrt_plan` model per engine (vision, segment_i, decode), every optimization
          profile listed in each instance group, and a BLS orchestrator (Python backend, same
          inputs/outputs as the python flavour) that runs the segments and picks the profile
          of each segment from the keep counts, as the runtime does.

The repository is self-describing: one `config.pbtxt` and a version folder `1/` per model,
a README.md, `start_server.sh`, and `sparsevlm_repo.json` (what was written, from what).

How the models find `sparsevlm`: the Python backend stub runs its own embedded interpreter
in the environment found through `python3` on PATH (the environment that holds the
`nvidia-pytriton` server; it must have numpy<2). Each Python model's config records the
site-packages directories where `sparsevlm` is installed (`sparsevlm_site_dirs`, default:
those of the interpreter that ran this command), and its `model.py` (model_shim.py) adds
them with `site.addsitedir` *after* the stub environment's own, so the stub keeps its
numpy<2 and the project's dependencies (torch, transformers, onnxruntime) come from the
project environment; then it imports the serving model its config names (`serving_model`).
Pass `--site-dirs ""` when the stub environment has sparsevlm installed itself.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

from sparsevlm.methods.files import atomic_directory

from . import RepoError
from .config_text import (NAME_TO_TRITON, REPO_SCHEMA, generate_model_config, onnx_graph_model_config,
                          tensorrt_model_config)

MODEL_SHIM = Path(__file__).with_name("model_shim.py")  # copied as <model>/1/model.py
GENERATE_MODEL = "sparsevlm.runtime.triton.generate_model:GenerateModel"
GRAPH_MODEL = "sparsevlm.runtime.triton.graph_model:GraphModel"
FLAVOURS = ("python", "tensorrt")
DEFAULT_NAME = "sparsevlm"
DEFAULT_PLUGIN_NAME = "libsparsevlm_plugins_static.so"  # self-registering variant (trt_plugins/CMakeLists.txt)
SERVE_COMMAND = "python -m sparsevlm.runtime.triton serve"  # the nvidia-pytriton server (server.py)


# ======================================================================================
# Where the project and the server live
# ======================================================================================

def project_site_dirs() -> list[str]:
    """site-packages directories from which `import sparsevlm` works in this interpreter."""
    import sparsevlm

    dirs = []
    for d in [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]:
        if d not in dirs and Path(d).is_dir():
            dirs.append(str(Path(d).resolve()))
    pkg = Path(sparsevlm.__file__).resolve().parent
    if not any(str(pkg).startswith(d) for d in dirs) and not any(Path(d, "__editable__.sparsevlm_trt-0.1.0.pth").exists()
                                                                for d in dirs):
        dirs.append(str(pkg.parent))  # a plain source checkout on sys.path
    # A `sparsevlm` directory on this process's sys.path (e.g. a package of links to a
    # checkout) wins over an editable install of another checkout: the server imports it too.
    imported_from = Path(sparsevlm.__file__).parent.parent
    if (imported_from / "sparsevlm").is_dir() and str(imported_from) not in dirs and str(imported_from) in sys.path:
        dirs.append(str(imported_from))
    return dirs


def check_artifact(artifact: Path) -> dict:
    """The artifact's manifest, after the checks the server's models would make when they
    load (schema, every file against its checksum, a valid method): a corrupted artifact is
    refused here, with the cause, instead of failing inside the server. RepoError otherwise."""
    from sparsevlm.runtime.artifact import Artifact

    try:
        return Artifact.load(artifact, verify_files=True).manifest
    except (ValueError, OSError, KeyError, TypeError) as error:
        detail = f"{type(error).__name__}: {error}" if isinstance(error, (KeyError, TypeError)) else str(error)
        raise RepoError(f"artifact: {artifact} cannot be served: {detail}") from None


# ======================================================================================
# Writing a repository
# ======================================================================================

@dataclass
class RepoInfo:
    path: Path
    flavour: str
    models: list[str]
    artifact: Path
    start_command: list[str] = field(default_factory=list)
    cpu_servable: bool = True
    notes: list[str] = field(default_factory=list)


def _write_python_model(model_dir: Path, config_text: str) -> None:
    """A Python-backend model: its config (which names the serving model) and the shim."""
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    (model_dir / "config.pbtxt").write_text(config_text)
    shutil.copyfile(MODEL_SHIM, model_dir / "1" / "model.py")


def write_repository(artifact: str | Path, out: str | Path, *, flavour: str = "python", instances: int = 1,
                     max_batch: int = 8, name: str = DEFAULT_NAME, backend: str = "auto", copy_artifact: bool = False,
                     queue_delay_us: int = 2000, site_dirs: list[str] | None = None, streaming: bool = True,
                     kind: str | None = None, plugin_library: str | None = None,
                     graph_backend: str = "tensorrt", overwrite: bool = False) -> RepoInfo:
    """Write the model repository `out` for `artifact`. Returns what was written.

    `graph_backend` (tensorrt flavour): "tensorrt" writes `tensorrt_plan` graph models;
    "onnxruntime" serves each graph from its ONNX file with a Python-backend model instead
    (same names, tensors and orchestrator), which runs on a CPU-only server."""
    if graph_backend not in ("tensorrt", "onnxruntime"):
        raise RepoError(f"graph_backend: expected 'tensorrt' or 'onnxruntime', got {graph_backend!r}")
    if flavour not in FLAVOURS:
        raise RepoError(f"flavour: expected one of {FLAVOURS}, got {flavour!r}")
    if instances < 1:
        raise RepoError(f"instances: expected >= 1, got {instances}")
    if max_batch < 0:
        raise RepoError(f"max_batch: expected >= 0, got {max_batch}")
    if not name.replace("_", "").replace("-", "").isalnum():
        raise RepoError(f"name: {name!r} is not a valid model name (letters, digits, '_', '-')")
    artifact = Path(artifact).resolve()
    manifest = check_artifact(artifact)
    out = Path(out).resolve()
    if out.exists():
        if not overwrite and any(out.iterdir()):
            raise RepoError(f"out: {out} exists and is not empty (pass overwrite=True / --overwrite)")
    site_dirs = project_site_dirs() if site_dirs is None else [d for d in site_dirs if d]

    # Build in a temporary sibling, then swap in: a half-written repository never exists.
    with atomic_directory(out) as tmp:
        if copy_artifact:
            shutil.copytree(artifact, tmp / "artifact")
            artifact_ref, artifact_param = out / "artifact", "artifact"  # relative to the repository
        else:
            artifact_ref, artifact_param = artifact, str(artifact)
        common = {"artifact": artifact_param, "sparsevlm_site_dirs": os.pathsep.join(site_dirs)}
        if flavour == "python":
            models, notes = _write_python_flavour(tmp, name, common, instances=instances, max_batch=max_batch,
                                                  backend=backend, queue_delay_us=queue_delay_us,
                                                  streaming=streaming, kind=kind or "KIND_CPU")
        else:
            models, notes = _write_tensorrt_flavour(tmp, name, common, artifact, manifest, instances=instances,
                                                    max_batch=max_batch, queue_delay_us=queue_delay_us,
                                                    plugin_library=plugin_library, graph_backend=graph_backend)
        info = RepoInfo(out, flavour, models, artifact_ref, notes=notes)
        needs_trt = flavour == "tensorrt" and graph_backend == "tensorrt"
        info.start_command = start_command_text(out, flavour, plugin_library=_plugin_path(artifact, plugin_library)
                                                if needs_trt else None)
        info.cpu_servable = not needs_trt
        (tmp / "sparsevlm_repo.json").write_text(json.dumps({
            "schema": REPO_SCHEMA, "flavour": flavour, "models": models, "artifact": str(artifact_ref),
            "artifact_copied": copy_artifact, "graph_backend": graph_backend if flavour == "tensorrt" else None, "instances": instances, "max_batch": max_batch,
            "sparsevlm_site_dirs": site_dirs, "start_command": info.start_command, "notes": notes,
            "method": manifest.get("method"),
        }, indent=2) + "\n")
        (tmp / "README.md").write_text(_readme(info, manifest, instances, max_batch, site_dirs))
        script = tmp / "start_server.sh"
        script.write_text(_start_script(needs_trt, _plugin_path(artifact, plugin_library)))
        script.chmod(0o755)
    return info


def _write_python_flavour(root: Path, name: str, common: dict, *, instances: int, max_batch: int, backend: str,
                          queue_delay_us: int, streaming: bool, kind: str) -> tuple[list[str], list[str]]:
    models = [name] + ([f"{name}_stream"] if streaming else [])
    for model in models:
        decoupled = model.endswith("_stream")
        params = dict(common, serving_model=GENERATE_MODEL, backend=backend, max_batch=str(max_batch))
        _write_python_model(root / model, generate_model_config(
            model, max_batch=max_batch, instances=instances, kind=kind, decoupled=decoupled,
            queue_delay_us=queue_delay_us, params=params))
    return models, []


def _plugin_path(artifact: Path, plugin_library: str | None) -> str:
    if plugin_library:
        return str(Path(plugin_library).resolve())
    for candidate in (artifact / DEFAULT_PLUGIN_NAME, artifact / "plugins" / DEFAULT_PLUGIN_NAME):
        if candidate.exists():
            return str(candidate)
    return f"/path/to/{DEFAULT_PLUGIN_NAME}"


# --------------------------------------------------------------------------------------
# TensorRT flavour: graphs and profiles from the manifest
# --------------------------------------------------------------------------------------

def _dims(shape: list) -> list[int]:
    # The exporter writes a dynamic dimension by its name (a string), a static one as its size.
    return [d if isinstance(d, int) and d >= 0 else -1 for d in shape]


def graph_io(name: str, graph: dict) -> tuple[list[tuple], list[tuple]]:
    """(inputs, outputs) of a manifest graph entry as (name, Triton dtype, dims) rows."""
    def rows(entries: list[dict]) -> list[tuple]:
        unknown = [e["name"] for e in entries if e["dtype"] not in NAME_TO_TRITON]
        if unknown:
            raise RepoError(f"manifest: graph {name!r} tensor(s) {unknown} have a type Triton cannot serve "
                            f"(expected one of {', '.join(NAME_TO_TRITON)})")
        return [(e["name"], NAME_TO_TRITON[e["dtype"]], _dims(e["shape"])) for e in entries]

    return rows(graph["inputs"]), rows(graph["outputs"])


def _engine_path(artifact: Path, name: str, manifest: dict) -> Path | None:
    """The engine sparsevlm-build recorded for graph `name`, if any."""
    entry = (manifest.get("engines") or {}).get(name)
    return artifact / entry["file"] if entry else None


def _write_tensorrt_flavour(root: Path, name: str, common: dict, artifact: Path, manifest: dict, *, instances: int,
                            max_batch: int, queue_delay_us: int, plugin_library: str | None,
                            graph_backend: str = "tensorrt") -> tuple[list[str], list[str]]:
    notes, segment_models = [], {}
    for graph_name, graph in manifest["graphs"].items():
        model = f"{name}_{graph_name}"
        inputs, outputs = graph_io(graph_name, graph)
        profiles = graph["profiles"]
        if graph_backend == "onnxruntime":
            _write_python_model(root / model, onnx_graph_model_config(
                model, inputs=inputs, outputs=outputs, instances=instances,
                params=dict(common, serving_model=GRAPH_MODEL, graph=graph_name)))
        else:
            (root / model / "1").mkdir(parents=True)
            (root / model / "config.pbtxt").write_text(tensorrt_model_config(
                model, inputs=inputs, outputs=outputs, num_profiles=len(profiles), instances=instances))
            engine = _engine_path(artifact, graph_name, manifest)
            if engine is not None and engine.exists():
                os.symlink(engine.resolve(), root / model / "1" / "model.plan")
            else:
                notes.append(f"{model}/1/model.plan is missing: build the engine for graph {graph_name!r} "
                             f"(sparsevlm-build) and place it there")
        (root / model / "profiles.json").write_text(json.dumps(profiles, indent=1) + "\n")
        segment_models[graph_name] = model
    params = dict(common, serving_model=GENERATE_MODEL, backend="triton-bls", max_batch=str(max_batch),
                  graph_models=json.dumps(segment_models, sort_keys=True),
                  plugin_library=_plugin_path(artifact, plugin_library))
    _write_python_model(root / name, generate_model_config(
        name, max_batch=max_batch, instances=instances, kind="KIND_CPU", decoupled=False,
        queue_delay_us=queue_delay_us, params=params))
    return [name] + sorted(segment_models.values()), notes


# --------------------------------------------------------------------------------------
# README and start script
# --------------------------------------------------------------------------------------

def start_command_text(repo: Path, flavour: str, plugin_library: str | None = None) -> list[str]:
    cmd = ["tritonserver", f"--model-repository={repo}", "--disable-auto-complete-config"]
    if plugin_library:
        cmd.append(f'--backend-config=tensorrt,plugins={plugin_library}')
    return cmd


def _start_script(needs_trt: bool, plugin_library: str) -> str:
    plugins = (f'\nPLUGINS="${{SPARSEVLM_PLUGIN_LIBRARY:-{plugin_library}}}"\n'
               'EXTRA+=("--backend-config=tensorrt,plugins=$PLUGINS")\n') if needs_trt else "\n"
    return f"""#!/usr/bin/env bash
# Start Triton on this repository. TRITONSERVER: a full tritonserver (NGC container,
# /opt/tritonserver/bin/tritonserver), or run `{SERVE_COMMAND} REPO`
# for the tritonserver bundled in the nvidia-pytriton wheel (Python backend only).
set -euo pipefail
REPO="$(cd "$(dirname "${{BASH_SOURCE[0]}}")" && pwd)"
TRITONSERVER="${{TRITONSERVER:-tritonserver}}"
EXTRA=(){plugins}exec "$TRITONSERVER" --model-repository="$REPO" --disable-auto-complete-config "${{EXTRA[@]}}" "$@"
"""


def _readme(info: RepoInfo, manifest: dict, instances: int, max_batch: int, site_dirs: list[str]) -> str:
    method = json.dumps(manifest.get("method", {}))
    lines = [f"# Triton model repository ({info.flavour} flavour)", "",
             f"Written by `sparsevlm-triton` for the artifact `{info.artifact}` (method {method}).",
             f"Instances per model: {instances}; dynamic batching up to {max_batch} rows.", "",
             "## Models", ""]
    for m in info.models:
        lines.append(f"- `{m}/` (`config.pbtxt`, version `1/`)")
    lines += ["", "## Start", "", "```bash", "./start_server.sh            # a full tritonserver on PATH, or TRITONSERVER=...",
              f"{SERVE_COMMAND} {info.path}   # the nvidia-pytriton server (CPU)",
              "```", "",
              "## Request contract", "",
              "Inputs (batch dimension first; send `[1, 1]` per request): `image` (TYPE_STRING: encoded image bytes), "
              "`prompt` (TYPE_STRING, UTF-8), optional `max_new_tokens` (INT32, default 32), `temperature` (FP32, "
              "default 0 = greedy), `top_p` (FP32, default 1), `seed` (INT64).",
              "Outputs: `text` (BYTES), `token_ids` (INT64, variable; -1 pads rows of one multi-row request), "
              "`kept_per_layer` (INT64: visual tokens kept at each pruning layer).", "",
              "The `_stream` model is decoupled: one response per generated token (`token_ids` [1, 1], `text` the new "
              "piece), then a last response with `kept_per_layer` and empty `token_ids`/`text`.", "",
              "## Python environment of the models", "",
              "The Python backend stub uses the environment whose `python3` is first on PATH (it must have "
              "numpy<2). `model.py` adds the directories in the `sparsevlm_site_dirs` parameter with "
              "`site.addsitedir`, after that environment's own:", ""]
    lines += [f"- `{d}`" for d in site_dirs] or ["- (none: sparsevlm is installed in the stub environment)"]
    if info.notes:
        lines += ["", "## Missing pieces", ""] + [f"- {n}" for n in info.notes]
    return "\n".join(lines) + "\n"


