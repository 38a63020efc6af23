"""sparsevlm-build: TensorRT engines for an exported artifact.

For every graph of `manifest.json` one engine is built, with one optimization profile per
entry of the graph's `profiles` (in order, so profile i of the engine is profile i of the
manifest). A profile maps each dynamic dimension name to [min, opt, max]; an input's
min/opt/max shapes are its `shape` with every name replaced by that value.

    sparsevlm-build --artifact DIR [--plugin-library PATH] [--graph NAME ...] [--timing-cache FILE]
                    [--version-compatible [--exclude-lean-runtime]] [--dry-run]

(`sparsevlm-build DIR`, the artifact as a positional argument, is the deprecated older form;
it still works.)

Needs TensorRT >= 10.7: from 10.7 the ONNX parser imports a node as its registered plugin
even when the model also carries a local function of the same name (here: the reference body
every `sparsevlm` node has, so that ONNX Runtime can run the graph); older parsers silently
import the body. The plugin library (`sparsevlm.trt_plugins.find_plugin_library`) is loaded
into TensorRT's plugin registry with `sparsevlm.trt_plugins.load_plugin_library` (the loader
the runtime uses too; loading twice in one process is fine), and the nodes carry
`plugin_namespace`, which selects the plugin. The parser keeps its default flags (setting any
would clear NATIVE_INSTANCENORM, which version-compatible builds need). After parsing, every
`sparsevlm` node must have become a plugin layer (`IPluginV3` in namespace `sparsevlm`), else
the build stops with a BuildError naming the nodes: never a silent fallback to a function
body. Networks are strongly typed: the ONNX types decide the precision. Engines go to
`ARTIFACT/engines/<graph>.plan` and are recorded in the manifest under `engines`:

    "engines": {"<graph>": {"file": "engines/<graph>.plan", "tensorrt_version": "11.1.0",
                            "version_compatible": false, "exclude_lean_runtime": false,
                            "embeds_lean_runtime": false,
                            "profiles": [{"dims": {"batch": [1, 1, 8], ...},
                                          "inputs": {"<input>": {"min": [...], "opt": [...],
                                                                  "max": [...]}}}, ...]}}

`embeds_lean_runtime` says whether the plan carries its own lean runtime (and the plugin
library): version compatible and not `--exclude-lean-runtime`. The runtime (`runtime.backends`)
allows engine host code for every version-compatible plan, and runs a plan without a lean
runtime through a lean runtime library of the TensorRT version that built it
(`Runtime.load_runtime`), with the plugin library loaded into that runtime's registry.

Every file is written to a temporary name and renamed, the manifest last. Building needs the
full `tensorrt` package and a GPU; `--dry-run` prints the profile tables without either.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from sparsevlm.cli import add_artifact_argument, add_verbose_flag, command
from sparsevlm.export.manifest import MANIFEST, read_manifest
from sparsevlm.methods.files import atomic_file
from sparsevlm.trt_plugins import PLUGIN_NAMESPACE

ENGINE_DIR = "engines"
ENGINE_SUFFIX = ".plan"


class BuildError(RuntimeError):
    """Building cannot start or failed; the message says what to fix."""


class ManifestError(ValueError):
    """The manifest's graph or profile description is inconsistent; the message names the
    graph, the profile index, the input and the dimension."""


# ---------------------------------------------------------------------------------------------
# Profile tables (pure Python: no TensorRT needed)


@dataclass(frozen=True)
class InputShapes:
    """min / opt / max shape of one input in one optimization profile."""

    name: str
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]


@dataclass(frozen=True)
class GraphPlan:
    """One engine to build: the ONNX file and, per optimization profile, every input's shapes."""

    name: str
    onnx_file: str
    profiles: tuple[tuple[InputShapes, ...], ...]
    profile_dims: tuple[dict, ...]  # the manifest's profiles, as validated


def _range(graph: str, index: int, dim: str, value) -> tuple[int, int, int]:
    where = f"graph {graph!r}, profile {index}, dimension {dim!r}"
    if (not isinstance(value, (list, tuple)) or len(value) != 3
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        raise ManifestError(f"{where}: expected [min, opt, max] integers, got {value!r}")
    low, opt, high = value
    if not 0 <= low <= opt <= high:
        raise ManifestError(f"{where}: expected 0 <= min <= opt <= max, got {list(value)}")
    return low, opt, high


def input_shapes(graph: str, index: int, inputs: list[dict], profile: dict) -> tuple[InputShapes, ...]:
    """Substitute the profile's [min, opt, max] for every named dimension of every input.
    Names in the profile that no input uses are allowed (outputs can have them)."""
    if not isinstance(profile, dict):
        raise ManifestError(f"graph {graph!r}, profile {index}: expected {{dimension: [min, opt, max]}}, "
                            f"got {profile!r}")
    ranges = {dim: _range(graph, index, dim, value) for dim, value in profile.items()}
    result = []
    for spec in inputs:
        name, shape = spec.get("name"), spec.get("shape")
        if not isinstance(name, str) or not isinstance(shape, list):
            raise ManifestError(f"graph {graph!r}: every input needs a 'name' and a 'shape' list, got {spec!r}")
        per_bound: list[list[int]] = [[], [], []]
        for dim in shape:
            if isinstance(dim, int) and not isinstance(dim, bool) and dim >= 0:
                values = (dim, dim, dim)
            elif isinstance(dim, str) and dim in ranges:
                values = ranges[dim]
            elif isinstance(dim, str):
                raise ManifestError(f"graph {graph!r}, profile {index}: input {name!r} has dimension {dim!r}, "
                                    f"which the profile does not give (it has {sorted(ranges)})")
            else:
                raise ManifestError(f"graph {graph!r}: input {name!r} has dimension {dim!r}; expected a "
                                    f"non-negative integer or a dimension name")
            for bound, value in zip(per_bound, values):
                bound.append(value)
        result.append(InputShapes(name, *(tuple(b) for b in per_bound)))
    return tuple(result)


def plan_graph(name: str, graph: dict) -> GraphPlan:
    """Validate one `graphs` entry of the manifest and compute its profile table."""
    if not isinstance(graph, dict) or not isinstance(graph.get("file"), str):
        raise ManifestError(f"graph {name!r}: expected an object with a 'file' (the ONNX file)")
    inputs = graph.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise ManifestError(f"graph {name!r}: expected a non-empty 'inputs' list")
    profiles = graph.get("profiles", [])
    if not isinstance(profiles, list):
        raise ManifestError(f"graph {name!r}: 'profiles' must be a list of {{dimension: [min, opt, max]}}")
    dynamic = sorted({d for spec in inputs for d in spec.get("shape", []) if isinstance(d, str)})
    if dynamic and not profiles:
        raise ManifestError(f"graph {name!r}: inputs have dynamic dimensions {dynamic} but the graph has no profiles")
    table = tuple(input_shapes(name, index, inputs, profile) for index, profile in enumerate(profiles))
    return GraphPlan(name, graph["file"], table, tuple(dict(p) for p in profiles))


def plan_engines(manifest: dict, graphs: list[str] | None = None) -> list[GraphPlan]:
    """The engines to build for a manifest: all graphs, or the named ones (in that order)."""
    table = manifest.get("graphs")
    if not isinstance(table, dict) or not table:
        raise ManifestError(f"{MANIFEST}: expected a non-empty 'graphs' object")
    names = list(table) if graphs is None else list(graphs)
    unknown = [n for n in names if n not in table]
    if unknown:
        raise ManifestError(f"{MANIFEST}: no graph named {', '.join(map(repr, unknown))} (graphs: {sorted(table)})")
    return [plan_graph(n, table[n]) for n in names]


def profile_table(plan: GraphPlan) -> list[dict]:
    """The JSON form recorded under engines[<graph>]['profiles']."""
    return [{"dims": {dim: list(value) for dim, value in dims.items()},
             "inputs": {s.name: {"min": list(s.min), "opt": list(s.opt), "max": list(s.max)} for s in shapes}}
            for dims, shapes in zip(plan.profile_dims, plan.profiles)]


# ---------------------------------------------------------------------------------------------
# The manifest's `engines`


def record_engines(artifact_dir: str | Path, entries: dict[str, dict]) -> None:
    """Merge `entries` into the manifest's `engines` object, atomically. The manifest is read
    again just before writing so that nothing written meanwhile is lost."""
    path = Path(artifact_dir) / MANIFEST
    manifest = json.loads(path.read_text())
    engines = manifest.get("engines") or {}
    engines.update(entries)
    manifest["engines"] = engines
    atomic_file(path, json.dumps(manifest, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------
# Building (TensorRT 10.x / 11.x Python API through polygraphy's loaders)


# The first ONNX parser that prefers a registered plugin over a node's local function.
MIN_TENSORRT_VERSION = (10, 7)


def check_tensorrt_version(version: str) -> None:
    """BuildError unless `version` (tensorrt.__version__) is at least MIN_TENSORRT_VERSION."""
    try:
        major_minor = tuple(int(part) for part in version.split(".")[:2])
    except ValueError:
        raise BuildError(f"cannot read the TensorRT version {version!r}") from None
    if major_minor < MIN_TENSORRT_VERSION:
        need = ".".join(map(str, MIN_TENSORRT_VERSION))
        raise BuildError(f"TensorRT {version} is too old: sparsevlm-build needs >= {need}, whose ONNX parser "
                         f"imports a `sparsevlm` node as its plugin instead of the node's local function body")


def import_tensorrt():
    """The full TensorRT package (builder and ONNX parser), or BuildError saying what is missing."""
    try:
        import tensorrt as trt
    except ImportError as error:
        raise BuildError(f"the full TensorRT Python package is not installed (import tensorrt: {error}); "
                         "install `tensorrt` (>= 10.7, from NVIDIA's package index) on a machine with an "
                         "NVIDIA GPU") from None
    if not hasattr(trt, "Builder") or not hasattr(trt, "OnnxParser"):
        raise BuildError("the installed `tensorrt` package has no builder or ONNX parser (a lean or dispatch "
                         "runtime?); engines need the full TensorRT package")
    check_tensorrt_version(trt.__version__)
    return trt


def load_plugin_library(trt, plugin_library: str | os.PathLike | None = None) -> Path:
    """Load libsparsevlm_plugins.so into TensorRT's plugin registry (dynamic loading through
    its getCreators entry point; never the static-registration variant). A library this
    process already loaded (e.g. by a pipeline) is not loaded again."""
    from sparsevlm import trt_plugins

    try:
        return trt_plugins.load_plugin_library(trt.get_plugin_registry(), plugin_library)
    except (FileNotFoundError, trt_plugins.PluginLibraryError) as error:
        raise BuildError(str(error)) from None


# ---------------------------------------------------------------------------------------------
# Every sparsevlm node must become a plugin layer (pure Python over descriptions)


@dataclass(frozen=True)
class PluginNode:
    """A `sparsevlm`-domain node of the ONNX graph."""

    name: str
    op_type: str


@dataclass(frozen=True)
class LayerInfo:
    """What the check needs of one network layer: its name and, for an IPluginV3 layer, the
    plugin's name and namespace (None for other layers)."""

    name: str
    plugin_name: str | None = None
    plugin_namespace: str | None = None


def plugin_nodes(model) -> list[PluginNode]:
    """The `sparsevlm`-domain nodes of an onnx.ModelProto's main graph."""
    from sparsevlm.export.onnx_ops import DOMAIN  # imports torch: not needed for --dry-run

    return [PluginNode(node.name, node.op_type) for node in model.graph.node if node.domain == DOMAIN]


def missing_plugin_layers(nodes: list[PluginNode], layers: list[LayerInfo]) -> list[PluginNode]:
    """The nodes that did not become `sparsevlm` plugin layers. A node counts as converted when
    a plugin layer of its op type has its name; the rest are matched by count per op type (the
    parser may rename a layer), and the unmatched remainder is returned."""
    missing = []
    for op_type in dict.fromkeys(node.op_type for node in nodes):
        expected = [node for node in nodes if node.op_type == op_type]
        found = [layer.name for layer in layers
                 if layer.plugin_name == op_type and layer.plugin_namespace == PLUGIN_NAMESPACE]
        unnamed = [node for node in expected if node.name not in found]
        spare = len(found) - (len(expected) - len(unnamed))
        if len(unnamed) > spare:
            missing.extend(unnamed)
    return missing


def describe_layers(trt, network) -> list[LayerInfo]:
    """LayerInfo for every layer of a parsed trt.INetworkDefinition."""
    layers = []
    for index in range(network.num_layers):
        layer = network.get_layer(index)
        if layer.type != trt.LayerType.PLUGIN_V3:
            layers.append(LayerInfo(layer.name))
            continue
        layer.__class__ = trt.IPluginV3Layer  # the bindings return the ILayer base class
        core = layer.plugin.get_capability_interface(trt.PluginCapabilityType.CORE)
        layers.append(LayerInfo(layer.name, core.plugin_name, core.plugin_namespace))
    return layers


def check_plugin_layers(graph: str, nodes: list[PluginNode], layers: list[LayerInfo]) -> None:
    """BuildError naming every `sparsevlm` node that is not a plugin layer of the network."""
    missing = missing_plugin_layers(nodes, layers)
    if missing:
        listed = ", ".join(f"{node.op_type} {node.name!r}" for node in missing)
        raise BuildError(f"graph {graph!r}: {len(missing)} of {len(nodes)} `sparsevlm` node(s) did not become "
                         f"TensorRT plugin layers in namespace {PLUGIN_NAMESPACE!r} ({listed}); the parser "
                         f"imported their ONNX function bodies instead. Is the plugin library built for this "
                         f"TensorRT version and loaded?")


def build_engines(artifact_dir: str | Path, plugin_library: str | os.PathLike | None = None, *,
                  graphs: list[str] | None = None, timing_cache: str | Path | None = None,
                  version_compatible: bool = False, exclude_lean_runtime: bool = False,
                  workspace_bytes: int | None = None, log=print) -> dict[str, Path]:
    """Build one engine per graph of the artifact (or per named graph) and record them in its
    manifest. Returns {graph: engine path}. Raises ManifestError for an inconsistent manifest
    and BuildError when TensorRT, the GPU or the plugin library is missing or a build fails."""
    root = Path(artifact_dir)
    if exclude_lean_runtime and not version_compatible:
        raise BuildError("--exclude-lean-runtime only applies to version-compatible engines "
                         "(add --version-compatible)")
    plans = plan_engines(read_manifest(root), graphs)
    for plan in plans:
        if not (root / plan.onnx_file).is_file():
            raise BuildError(f"graph {plan.name!r}: {root / plan.onnx_file} is missing")

    trt = import_tensorrt()
    import onnx
    from polygraphy.backend.trt import (CreateConfig, EngineBytesFromNetwork, NetworkFromOnnxPath,
                                        PostprocessConfig, Profile)

    library = load_plugin_library(trt, plugin_library)
    entries, built = {}, {}
    for plan in plans:
        profiles = []
        for shapes in plan.profiles:
            profile = Profile()
            for s in shapes:
                profile.add(s.name, min=s.min, opt=s.opt, max=s.max)
            profiles.append(profile)
        onnx_path = root / plan.onnx_file
        try:
            # Default parser flags: see the module docstring.
            network = NetworkFromOnnxPath(str(onnx_path), strongly_typed=True)()
        except Exception as error:  # polygraphy raises its own PolygraphyException on parse errors
            raise BuildError(f"graph {plan.name!r}: TensorRT could not parse {onnx_path} ({error})") from error
        check_plugin_layers(plan.name, plugin_nodes(onnx.load(str(onnx_path), load_external_data=False)),
                            describe_layers(trt, network[1]))
        config = CreateConfig(
            profiles=profiles or None,
            load_timing_cache=str(timing_cache) if timing_cache and Path(timing_cache).is_file() else None,
            memory_pool_limits={trt.MemoryPoolType.WORKSPACE: workspace_bytes} if workspace_bytes else None,
            version_compatible=version_compatible or None,
            exclude_lean_runtime=exclude_lean_runtime or None)
        if version_compatible and not exclude_lean_runtime:
            # A version-compatible plan carries its plugin library, so a newer runtime can load it.
            config = PostprocessConfig(config, lambda builder, network, cfg: setattr(
                cfg, "plugins_to_serialize", [str(library)]))
        # Bytes, not an ICudaEngine: deserializing here would need engine host code allowed
        # for version-compatible plans, and buys nothing.
        engine_bytes = EngineBytesFromNetwork(network, config,
                                              save_timing_cache=str(timing_cache) if timing_cache else None)
        relative = f"{ENGINE_DIR}/{plan.name}{ENGINE_SUFFIX}"
        log(f"building {relative} ({len(plan.profiles)} profile(s))")
        try:
            data = engine_bytes()
        except Exception as error:  # polygraphy raises its own PolygraphyException on build failure
            raise BuildError(f"graph {plan.name!r}: TensorRT could not build the engine ({error})") from error
        if data is None:
            raise BuildError(f"graph {plan.name!r}: TensorRT returned no engine (see the TensorRT log above)")
        atomic_file(root / relative, bytes(data))
        entries[plan.name] = {"file": relative, "tensorrt_version": trt.__version__,
                              "version_compatible": version_compatible,
                              "exclude_lean_runtime": exclude_lean_runtime,
                              "embeds_lean_runtime": version_compatible and not exclude_lean_runtime,
                              "profiles": profile_table(plan)}
        built[plan.name] = root / relative
    record_engines(root, entries)
    return built


# ---------------------------------------------------------------------------------------------
# Command line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparsevlm-build", description=(
        "Build TensorRT engines for a sparsevlm artifact: one engine per graph, one optimization "
        "profile per manifest profile; engines are recorded in the artifact's manifest."))
    add_artifact_argument(parser, required=False,  # so that the old positional form can stand in for it
                          help="artifact directory written by sparsevlm-export (required)")
    # Deprecated: the artifact as a positional argument (`sparsevlm-build DIR`), as before the
    # commands agreed on --artifact; still accepted, no longer shown.
    parser.add_argument("positional_artifact", nargs="?", metavar="DIR", help=argparse.SUPPRESS)
    parser.add_argument("--plugin-library", help="libsparsevlm_plugins.so (default: $SPARSEVLM_PLUGIN_LIB, "
                                                 "then trt_plugins/build)")
    parser.add_argument("--graph", action="append", dest="graphs", metavar="NAME",
                        help="build only this graph (repeatable)")
    parser.add_argument("--timing-cache", help="timing cache file: read if present, written after each build")
    parser.add_argument("--workspace-gib", type=float, help="workspace memory pool limit in GiB")
    parser.add_argument("--version-compatible", action="store_true",
                        help="build version-compatible engines (runnable by newer TensorRT runtimes)")
    parser.add_argument("--exclude-lean-runtime", action="store_true",
                        help="with --version-compatible: leave the lean runtime out of the plan")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the profile table of each engine and stop (no TensorRT needed)")
    add_verbose_flag(parser)
    return parser


@command("sparsevlm-build", user_errors=(BuildError,))  # failures: one line, exit 2 (sparsevlm.cli)
def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.artifact and args.positional_artifact:
        parser.error(f"the artifact is given twice ({args.artifact}, {args.positional_artifact}); "
                     "expected only --artifact DIR")
    artifact = args.artifact or args.positional_artifact
    if not artifact:
        parser.error("the following arguments are required: --artifact")
    if args.dry_run:
        plans = plan_engines(read_manifest(artifact), args.graphs)
        print(json.dumps({p.name: profile_table(p) for p in plans}, indent=2))
        return 0
    built = build_engines(artifact, args.plugin_library, graphs=args.graphs,
                          timing_cache=args.timing_cache, version_compatible=args.version_compatible,
                          exclude_lean_runtime=args.exclude_lean_runtime,
                          workspace_bytes=int(args.workspace_gib * (1 << 30)) if args.workspace_gib else None)
    for name, path in built.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
