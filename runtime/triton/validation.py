"""Offline validation of a model repository written by `sparsevlm-triton` (no server)."""

from __future__ import annotations

import json
from pathlib import Path

from sparsevlm.export.manifest import ArtifactError


def validate_repository(repo: str | Path, require_plans: bool = False) -> list[str]:
    """Check a repository without a server. Returns the list of problems (empty: valid).

    Every config.pbtxt parses into Triton's ModelConfig; its name matches its folder; a
    numeric version folder exists; Python models have model.py; TensorRT models have every
    instance group listing valid profiles (and model.plan when `require_plans`); models
    referenced by a BLS orchestrator (`graph_models`) exist with the inputs of their graph;
    the artifact a model names loads."""
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
        problems += _model_problems(d, config, require_plans)
    artifacts: dict[Path, object] = {}  # artifact path -> Artifact, or the error loading it
    for model, config in configs.items():
        params = {k: v.string_value for k, v in config.parameters.items()}
        if "artifact" not in params:
            continue
        loaded = _load_artifact(repo, params["artifact"], artifacts)
        if isinstance(loaded, ArtifactError):
            problems.append(f"{model}: {loaded}")
            continue
        if "graph_models" in params:
            problems += _bls_problems(model, json.loads(params["graph_models"]), configs, loaded.manifest["graphs"])
    return problems


def _model_problems(d: Path, config, require_plans: bool) -> list[str]:
    """What is wrong with one parsed model folder on its own."""
    problems = []
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
            plan = config.default_model_filename or "model.plan"
            problems += [f"{d.name}/{v.name}: no {plan}" for v in versions if not (v / plan).exists()]
    else:
        problems.append(f"{d.name}: unexpected backend/platform {config.backend or config.platform!r}")
    return problems


def _load_artifact(repo: Path, reference: str, loaded: dict):
    """The Artifact a model's `artifact` parameter names (absolute, or relative to the
    repository), or the ArtifactError loading it; each artifact is read once."""
    from sparsevlm.runtime.artifact import Artifact

    path = Path(reference) if Path(reference).is_absolute() else repo / reference
    if path not in loaded:
        try:
            loaded[path] = Artifact.load(path, verify_files=False)
        except ArtifactError as error:
            loaded[path] = error
    return loaded[path]


def _bls_problems(model: str, graph_models: dict, configs: dict, graphs: dict) -> list[str]:
    """The orchestrator `model`'s references: each graph's model exists, is servable, and
    takes the graph's inputs."""
    problems = []
    for graph, target in graph_models.items():
        if target not in configs:
            problems.append(f"{model}: BLS graph {graph!r} refers to model {target!r}, which is not in the repository")
        elif configs[target].platform != "tensorrt_plan" and configs[target].backend != "python":
            problems.append(f"{model}: BLS target {target!r} is neither a tensorrt_plan nor a Python model")
        elif graph not in graphs:
            problems.append(f"{model}: BLS graph {graph!r} is not a graph of the artifact")
        else:
            io = {t.name for t in configs[target].input}
            wanted = {i["name"] for i in graphs[graph]["inputs"]}
            if wanted != io:
                problems.append(f"{model}: BLS target {target!r} inputs {sorted(io)} differ from graph "
                                f"{graph!r} inputs {sorted(wanted)}")
    return problems
