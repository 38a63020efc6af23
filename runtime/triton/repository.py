"""`sparsevlm-triton`: write a Triton Inference Server model repository for an artifact.

    sparsevlm-triton --artifact ART --out REPO [--flavour python|tensorrt] [--instances N] [--max-batch B]

Two flavours (see README.md in this folder for the deployment guide):

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
those of the interpreter that ran this command) and `model.py` adds them with
`site.addsitedir` *after* the stub environment's own, so the stub keeps its numpy<2 and the
project's dependencies (torch, transformers, onnxruntime) come from the project environment.
Pass `--site-dirs ""` when the stub environment has sparsevlm installed itself.

The launcher for the `tritonserver` bundled in the `nvidia-pytriton` wheel (tests,
benchmarks, the `serve` subcommand) is `server.py`.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

from sparsevlm.cli import add_verbose_flag, command
from sparsevlm.methods.files import atomic_directory

MODELS_DIR = Path(__file__).parent  # the model.py templates: generate_model.py, graph_model.py
REPO_SCHEMA = "sparsevlm-triton-repo/1"
FLAVOURS = ("python", "tensorrt")
DEFAULT_NAME = "sparsevlm"
DEFAULT_PLUGIN_NAME = "libsparsevlm_plugins_static.so"  # self-registering variant (trt_plugins/CMakeLists.txt)

# ONNX TensorProto element type -> Triton data type.
ONNX_TO_TRITON = {1: "TYPE_FP32", 2: "TYPE_UINT8", 3: "TYPE_INT8", 4: "TYPE_UINT16", 5: "TYPE_INT16",
                  6: "TYPE_INT32", 7: "TYPE_INT64", 9: "TYPE_BOOL", 10: "TYPE_FP16", 11: "TYPE_FP64",
                  12: "TYPE_UINT32", 13: "TYPE_UINT64", 16: "TYPE_BF16"}
NAME_TO_TRITON = {"float32": "TYPE_FP32", "float": "TYPE_FP32", "float16": "TYPE_FP16", "half": "TYPE_FP16",
                  "bfloat16": "TYPE_BF16", "float64": "TYPE_FP64", "int64": "TYPE_INT64", "int32": "TYPE_INT32",
                  "int8": "TYPE_INT8", "uint8": "TYPE_UINT8", "bool": "TYPE_BOOL"}


class RepoError(ValueError):
    """The repository could not be written, or does not validate."""


# ======================================================================================
# config.pbtxt text
# ======================================================================================

def _q(text: str) -> str:
    return json.dumps(str(text))  # a protobuf text-format string literal (JSON escapes are valid)


def _tensor(name: str, dtype: str, dims: list[int], optional: bool = False) -> str:
    extra = " optional: true" if optional else ""
    return f'  {{ name: {_q(name)} data_type: {dtype} dims: [ {", ".join(str(int(d)) for d in dims)} ]{extra} }}'


def _parameters(params: dict) -> str:
    if not params:
        return ""
    rows = [f"  {{ key: {_q(k)} value: {{ string_value: {_q(v)} }} }}" for k, v in params.items()]
    return "parameters [\n" + ",\n".join(rows) + "\n]\n"


def _config(name: str, body: str, inputs: list[str], outputs: list[str], params: dict | None = None) -> str:
    return (f"# Written by sparsevlm-triton ({REPO_SCHEMA}); see ../README.md.\n"
            f"name: {_q(name)}\n{body}"
            "input [\n" + ",\n".join(inputs) + "\n]\n"
            "output [\n" + ",\n".join(outputs) + "\n]\n" + _parameters(params or {}))


# The request/response contract shared by the python-flavour models and the TensorRT-flavour
# orchestrator. Batch dimension first (max_batch_size > 0): a client sends [rows, 1].
GENERATE_INPUTS = [
    ("image", "TYPE_STRING", [1], False),          # encoded image bytes (PNG, JPEG, ...)
    ("prompt", "TYPE_STRING", [1], False),         # the user's question, UTF-8
    ("max_new_tokens", "TYPE_INT32", [1], True),   # default 32
    ("temperature", "TYPE_FP32", [1], True),       # default 0 (greedy)
    ("top_p", "TYPE_FP32", [1], True),             # default 1
    ("seed", "TYPE_INT64", [1], True),             # default none (0 when sampling)
]
GENERATE_OUTPUTS = [
    ("text", "TYPE_STRING", [1]),
    ("token_ids", "TYPE_INT64", [-1]),        # generated ids; rows of one request padded with -1
    ("kept_per_layer", "TYPE_INT64", [-1]),   # visual tokens kept at each pruning layer
]


def generate_model_config(name: str, *, max_batch: int, instances: int, kind: str, decoupled: bool,
                          queue_delay_us: int, params: dict) -> str:
    body = f'backend: "python"\nmax_batch_size: {int(max_batch)}\n'
    body += f"instance_group [ {{ kind: {kind} count: {int(instances)} }} ]\n"
    if max_batch > 0:
        body += f"dynamic_batching {{ max_queue_delay_microseconds: {int(queue_delay_us)} }}\n"
    if decoupled:
        body += "model_transaction_policy { decoupled: true }\n"
    return _config(name, body, [_tensor(n, t, d, o) for n, t, d, o in GENERATE_INPUTS],
                   [_tensor(n, t, d) for n, t, d in GENERATE_OUTPUTS], params)


def tensorrt_model_config(name: str, *, inputs: list[tuple], outputs: list[tuple], num_profiles: int,
                          instances: int) -> str:
    """A `tensorrt_plan` model. max_batch_size 0: the engines' batch dimension is an ordinary
    dynamic dimension of their profiles, and the orchestrator sends whole batches. Every
    instance lists every profile: Triton's scheduler hands a request to any free instance,
    so an instance that lacked the profile matching the request's shapes would fail it."""
    profiles = ", ".join(_q(str(i)) for i in range(num_profiles))
    body = ('platform: "tensorrt_plan"\nmax_batch_size: 0\ndefault_model_filename: "model.plan"\n'
            f"instance_group [ {{ kind: KIND_GPU count: {int(instances)} profile: [ {profiles} ] }} ]\n")
    return _config(name, body, [_tensor(n, t, d) for n, t, d in inputs], [_tensor(n, t, d) for n, t, d in outputs],
                   {"execution_context_allocation_strategy": "STATIC"})


def onnx_graph_model_config(name: str, *, inputs: list[tuple], outputs: list[tuple], instances: int,
                            params: dict) -> str:
    """A Python-backend model serving one graph on onnxruntime (`--graph-backend onnxruntime`)."""
    body = f'backend: "python"\nmax_batch_size: 0\ninstance_group [ {{ kind: KIND_CPU count: {int(instances)} }} ]\n'
    return _config(name, body, [_tensor(n, t, d) for n, t, d in inputs], [_tensor(n, t, d) for n, t, d in outputs],
                   params)


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


def _copy_template(template: str, dest_dir: Path) -> None:
    dest_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(MODELS_DIR / template, dest_dir / "model.py")


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
        params = dict(common, backend=backend, max_batch=str(max_batch))
        (root / model).mkdir(parents=True)
        (root / model / "config.pbtxt").write_text(generate_model_config(
            model, max_batch=max_batch, instances=instances, kind=kind, decoupled=decoupled,
            queue_delay_us=queue_delay_us, params=params))
        _copy_template("generate_model.py", root / model / "1")
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

def manifest_graphs(manifest: dict) -> list[dict]:
    """The manifest's graphs as a list of {"name", "file", "profiles", "inputs"?, "outputs"?, "engine"?}.
    Accepts `graphs` as a dict keyed by name or a list of entries with a `name`."""
    graphs = manifest.get("graphs")
    if isinstance(graphs, dict):
        graphs = [dict(entry, name=entry.get("name", key)) for key, entry in graphs.items()]
    if not graphs:
        raise RepoError("tensorrt flavour: the manifest lists no graphs")
    for g in graphs:
        if "name" not in g:
            raise RepoError(f"tensorrt flavour: a manifest graph has no name: {sorted(g)}")
    return graphs


def _dims(shape) -> list[int]:
    return [d if isinstance(d, int) and d >= 0 else -1 for d in shape]


def graph_io(artifact: Path, graph: dict) -> tuple[list[tuple], list[tuple]]:
    """(inputs, outputs) as (name, triton dtype, dims) from the manifest entry, or else from
    the graph's ONNX file (its structure only; external weights are not loaded)."""
    def from_entries(entries):
        return [(e["name"], NAME_TO_TRITON.get(str(e.get("dtype", "float32")).replace("torch.", ""), "TYPE_FP32")
                 if not str(e.get("dtype", "")).startswith("TYPE_") else e["dtype"], _dims(e.get("shape", [-1])))
                for e in entries]

    if graph.get("inputs") and isinstance(graph["inputs"][0], dict) and "shape" in graph["inputs"][0]:
        return from_entries(graph["inputs"]), from_entries(graph["outputs"])
    file = graph.get("file") or graph.get("onnx") or f"{graph['name']}.onnx"
    import onnx

    proto = onnx.load(str(artifact / file), load_external_data=False)

    def from_onnx(values):
        rows = []
        for v in values:
            t = v.type.tensor_type
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
            rows.append((v.name, ONNX_TO_TRITON.get(t.elem_type, "TYPE_FP32"), dims))
        return rows

    return from_onnx(proto.graph.input), from_onnx(proto.graph.output)


def _engine_path(artifact: Path, graph: dict, manifest: dict) -> Path | None:
    entry = (manifest.get("engines") or {}).get(graph["name"])
    if entry:
        return artifact / (entry["file"] if isinstance(entry, dict) else entry)
    for key in ("engine", "plan"):
        if graph.get(key):
            return artifact / graph[key]
    for candidate in (artifact / "engines" / f"{graph['name']}.plan", artifact / "engines" / f"{graph['name']}.engine",
                      artifact / f"{graph['name']}.plan"):
        if candidate.exists():
            return candidate
    return None


def _write_tensorrt_flavour(root: Path, name: str, common: dict, artifact: Path, manifest: dict, *, instances: int,
                            max_batch: int, queue_delay_us: int, plugin_library: str | None,
                            graph_backend: str = "tensorrt") -> tuple[list[str], list[str]]:
    notes, segment_models = [], {}
    for graph in manifest_graphs(manifest):
        model = f"{name}_{graph['name']}"
        inputs, outputs = graph_io(artifact, graph)
        profiles = graph.get("profiles") or [{}]
        (root / model / "1").mkdir(parents=True)
        if graph_backend == "onnxruntime":
            (root / model / "config.pbtxt").write_text(onnx_graph_model_config(
                model, inputs=inputs, outputs=outputs, instances=instances,
                params=dict(common, graph=graph["name"])))
            _copy_template("graph_model.py", root / model / "1")
        else:
            (root / model / "config.pbtxt").write_text(tensorrt_model_config(
                model, inputs=inputs, outputs=outputs, num_profiles=len(profiles), instances=instances))
            engine = _engine_path(artifact, graph, manifest)
            if engine is not None and engine.exists():
                os.symlink(engine.resolve(), root / model / "1" / "model.plan")
            else:
                notes.append(f"{model}/1/model.plan is missing: build the engine for graph {graph['name']!r} "
                             f"(sparsevlm-build) and place it there")
        (root / model / "profiles.json").write_text(json.dumps(profiles, indent=1) + "\n")
        segment_models[graph["name"]] = model
    params = dict(common, backend="triton-bls", max_batch=str(max_batch),
                  graph_models=json.dumps(segment_models, sort_keys=True),
                  plugin_library=_plugin_path(artifact, plugin_library))
    (root / name).mkdir(parents=True)
    (root / name / "config.pbtxt").write_text(generate_model_config(
        name, max_batch=max_batch, instances=instances, kind="KIND_CPU", decoupled=False,
        queue_delay_us=queue_delay_us, params=params))
    _copy_template("generate_model.py", root / name / "1")
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
# /opt/tritonserver/bin/tritonserver), or run `python -m sparsevlm.runtime.triton.repository serve REPO`
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
              f"python -m sparsevlm.runtime.triton.repository serve {info.path}   # the nvidia-pytriton server (CPU)",
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


# ======================================================================================
# Offline validation
# ======================================================================================

def validate_repository(repo: str | Path, require_plans: bool = False) -> list[str]:
    """Check a repository without a server. Returns the list of problems (empty: valid).

    Every config.pbtxt parses into Triton's ModelConfig; its name matches its folder; a
    numeric version folder exists; Python models have model.py; TensorRT models have every
    instance group listing valid profiles (and model.plan when `require_plans`); models
    referenced by a BLS orchestrator (`graph_models`) exist with matching I/O names."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    repo = Path(repo)
    if not repo.is_dir():
        return [f"{repo}: {'is not a directory' if repo.exists() else 'does not exist'} (expected a model repository)"]
    problems, configs = [], {}
    dirs = sorted(p for p in repo.iterdir() if p.is_dir() and (p / "config.pbtxt").exists())
    if not dirs:
        return [f"{repo}: no model folders with a config.pbtxt"]
    for d in dirs:
        config = model_config_pb2.ModelConfig()
        try:
            text_format.Parse((d / "config.pbtxt").read_text(), config)
        except text_format.ParseError as error:
            problems.append(f"{d.name}/config.pbtxt: {error}")
            continue
        configs[d.name] = config
        if config.name != d.name:
            problems.append(f"{d.name}/config.pbtxt: name {config.name!r} does not match its folder")
        versions = [v for v in d.iterdir() if v.is_dir() and v.name.isdigit()]
        if not versions:
            problems.append(f"{d.name}: no version folder (1/)")
        if not config.input or not config.output:
            problems.append(f"{d.name}: no inputs or no outputs")
        names = [t.name for t in config.input] + [t.name for t in config.output]
        if len(set(names)) != len(names):
            problems.append(f"{d.name}: duplicate tensor names")
        if config.backend == "python":
            for v in versions:
                if not (v / "model.py").exists():
                    problems.append(f"{d.name}/{v.name}: no model.py")
            if config.max_batch_size > 0 and not config.HasField("dynamic_batching"):
                problems.append(f"{d.name}: max_batch_size > 0 without dynamic_batching")
        elif config.platform == "tensorrt_plan":
            profiles_file = d / "profiles.json"
            count = len(json.loads(profiles_file.read_text())) if profiles_file.exists() else None
            if not config.instance_group:
                problems.append(f"{d.name}: no instance_group")
            for group in config.instance_group:
                listed = list(group.profile)
                if not listed:
                    problems.append(f"{d.name}: instance group lists no profile (Triton would use profile 0 only)")
                if not all(p.isdigit() for p in listed):
                    problems.append(f"{d.name}: profile entries must be integer strings, got {listed}")
                elif count is not None and sorted(int(p) for p in listed) != list(range(count)):
                    problems.append(f"{d.name}: instance group profiles {listed} != the engine's {count} profiles")
            if require_plans:
                for v in versions:
                    if not (v / (config.default_model_filename or "model.plan")).exists():
                        problems.append(f"{d.name}/{v.name}: no {config.default_model_filename or 'model.plan'}")
        else:
            problems.append(f"{d.name}: unexpected backend/platform {config.backend or config.platform!r}")
    for model, config in configs.items():
        params = {k: v.string_value for k, v in config.parameters.items()}
        graphs_of = None
        if "artifact" in params:
            art = Path(params["artifact"]) if Path(params["artifact"]).is_absolute() else repo / params["artifact"]
            try:
                graphs_of = json.loads((art / "manifest.json").read_text()).get("graphs")
            except (OSError, json.JSONDecodeError):
                graphs_of = None
        if "graph_models" in params:
            for graph, target in json.loads(params["graph_models"]).items():
                if target not in configs:
                    problems.append(f"{model}: BLS graph {graph!r} refers to model {target!r}, which is not in the repository")
                elif configs[target].platform != "tensorrt_plan" and configs[target].backend != "python":
                    problems.append(f"{model}: BLS target {target!r} is neither a tensorrt_plan nor a Python model")
                else:
                    io = {t.name for t in configs[target].input}
                    graph_entry = graphs_of.get(graph) if graphs_of else None
                    if graph_entry is not None:
                        wanted = {i["name"] for i in graph_entry.get("inputs", [])}
                        if wanted and wanted != io:
                            problems.append(f"{model}: BLS target {target!r} inputs {sorted(io)} differ from graph "
                                            f"{graph!r} inputs {sorted(wanted)}")
        if "artifact" in params:
            art = Path(params["artifact"])
            art = art if art.is_absolute() else repo / art
            if not (art / "manifest.json").exists():
                problems.append(f"{model}: artifact {art} has no manifest.json")
    return problems


# CLI
# ======================================================================================

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sparsevlm-triton", description=__doc__.split("\n\n")[0])
    p.add_argument("--artifact", help="artifact directory (from sparsevlm-export / sparsevlm-build)")
    p.add_argument("--out", help="model repository to write")
    p.add_argument("--flavour", choices=FLAVOURS, default="python")
    p.add_argument("--instances", type=int, default=1, help="instances per model (instance_group count)")
    p.add_argument("--max-batch", type=int, default=8, help="max_batch_size of the generate models (0: no batching)")
    p.add_argument("--queue-delay-us", type=int, default=2000, help="dynamic batching max_queue_delay_microseconds")
    p.add_argument("--name", default=DEFAULT_NAME, help="name of the generate model")
    p.add_argument("--backend", default="auto", choices=["auto", "onnxruntime", "tensorrt", "torch"],
                   help="python flavour: runtime backend (auto: tensorrt with a GPU and engines, else onnxruntime)")
    p.add_argument("--kind", default=None, choices=["KIND_CPU", "KIND_GPU"], help="python flavour instance kind")
    p.add_argument("--no-stream", action="store_true", help="python flavour: no decoupled _stream model")
    p.add_argument("--copy-artifact", action="store_true", help="copy the artifact into the repository")
    p.add_argument("--graph-backend", choices=["tensorrt", "onnxruntime"], default="tensorrt",
                   help="tensorrt flavour: tensorrt_plan graph models, or Python/onnxruntime ones (CPU server)")
    p.add_argument("--plugin-library", help=f"tensorrt flavour: {DEFAULT_PLUGIN_NAME} (for --backend-config)")
    p.add_argument("--site-dirs", default=None,
                   help=f"'{os.pathsep}'-separated dirs the models add to sys.path to import sparsevlm "
                        "(default: this interpreter's site-packages; '' when the stub env has sparsevlm)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--validate", metavar="REPO", help="only validate an existing repository offline")
    add_verbose_flag(p)
    return p


@command("sparsevlm-triton")  # failures: one line, exit 2 (sparsevlm.cli)
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        from .server import serve
        return serve(argv[1:])
    args = _parser().parse_args(argv)
    if args.validate:
        target = Path(args.validate)
        if not target.is_dir():  # one line from the command wrapper, not a problem report
            state = "is not a directory" if target.exists() else "does not exist"
            raise RepoError(f"--validate: {target} {state} (expected a model repository written by sparsevlm-triton)")
        problems = validate_repository(args.validate)
        for line in problems:
            print(f"error: {line}", file=sys.stderr)
        print("valid" if not problems else f"{len(problems)} problem(s)")
        return 1 if problems else 0
    if not args.artifact or not args.out:
        _parser().error("--artifact and --out are required")
    site_dirs = None if args.site_dirs is None else args.site_dirs.split(os.pathsep)
    try:
        info = write_repository(args.artifact, args.out, flavour=args.flavour, instances=args.instances,
                                max_batch=args.max_batch, name=args.name, backend=args.backend,
                                copy_artifact=args.copy_artifact, queue_delay_us=args.queue_delay_us,
                                site_dirs=site_dirs, streaming=not args.no_stream, kind=args.kind,
                                plugin_library=args.plugin_library, graph_backend=args.graph_backend,
                                overwrite=args.overwrite)
        problems = validate_repository(info.path)
    except Exception as error:  # noqa: BLE001 - a CLI reports, it does not trace back
        print(f"sparsevlm-triton: error: {error}", file=sys.stderr)
        return 1
    for line in problems:
        print(f"error: {line}", file=sys.stderr)
    print(f"wrote {info.flavour} repository {info.path}: models {', '.join(info.models)}")
    for note in info.notes:
        print(f"note: {note}")
    print("start the server with:")
    print(f"  {shlex.join(info.start_command)}        # a full tritonserver (NGC container)")
    if info.cpu_servable:
        print(f"  python -m sparsevlm.runtime.triton.repository serve {info.path}        # the nvidia-pytriton server (CPU)")
    print("then: python -m sparsevlm.runtime.triton.client --url 127.0.0.1:8000 --image IMG --prompt 'What is in the image?'")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
