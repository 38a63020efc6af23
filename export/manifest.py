"""The artifact manifest (`manifest.json`, schema `sparsevlm-artifact/1`): what an export
wrote and everything a runtime needs to run it. Written last, so a directory without a
valid manifest is never an artifact."""

from __future__ import annotations

import hashlib
import json
from dataclasses import fields
from pathlib import Path

from sparsevlm.methods.spec import ModelSpec

SCHEMA = "sparsevlm-artifact/1"
SCHEMA_VERSION = 1
MANIFEST = "manifest.json"


class ArtifactError(ValueError):
    """The artifact directory is missing, partial, corrupted or from another version."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_table(root: Path, names: list[str]) -> dict:
    return {name: {"sha256": sha256_file(root / name), "bytes": (root / name).stat().st_size} for name in sorted(names)}


def read_manifest(artifact: str | Path, verify_files: bool = True) -> dict:
    """Load and check `artifact/manifest.json`: schema version and (optionally) checksums."""
    root = Path(artifact)
    path = root / MANIFEST
    if not root.is_dir():
        raise ArtifactError(f"artifact: {root} is not a directory")
    if not path.exists():
        raise ArtifactError(f"artifact: {root} has no {MANIFEST} (not an export, or an interrupted one)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ArtifactError(f"artifact: {path} is not valid JSON ({error})") from None
    if not isinstance(manifest, dict):
        raise ArtifactError(f"artifact: {path} holds a JSON {type(manifest).__name__}; expected an object")
    schema = manifest.get("schema", "")
    schema = schema if isinstance(schema, str) else repr(schema)
    name, _, version = schema.rpartition("/")
    if name != "sparsevlm-artifact" or not version.isdigit():
        raise ArtifactError(f"artifact: {path} has schema {schema!r}; expected {SCHEMA!r}")
    if int(version) > SCHEMA_VERSION:
        raise ArtifactError(f"artifact: {path} uses schema version {version}, newer than this toolkit's "
                            f"{SCHEMA_VERSION}; upgrade sparsevlm-trt or re-export")
    check_shape(manifest, path)
    if verify_files:
        for name, entry in manifest["files"].items():
            file = root / name
            if not file.resolve().is_relative_to(root.resolve()):
                raise ArtifactError(f"artifact: {path} lists {name!r}, which is outside the artifact")
            if not file.exists():
                raise ArtifactError(f"artifact: {file} is missing")
            if file.stat().st_size != entry["bytes"] or sha256_file(file) != entry["sha256"]:
                raise ArtifactError(f"artifact: {file} does not match its checksum in {MANIFEST} (corrupted or edited)")
    return manifest


# The fields a runtime reads, and their JSON types (a manifest is checked against this table
# before anything uses it, so a hand-edited or foreign manifest fails with the field's name).
# `model` holds the checkpoint's source and config hash and the ModelSpec (every field an
# integer but these, which may be null or absent: manifests written before the field existed
# read as LLaVA-1.5).
_OPTIONAL_SPEC_FIELDS = {"max_position_embeddings": int, "model_type": str, "patch_size": int,
                         "image_grid_pinpoints": list, "min_visual": int, "spatial_merge_size": int,
                         "window_size": int, "temporal_patch_size": int}
_MODEL_FIELDS = {"source": str, "config_sha256": str,
                 **{f.name: int for f in fields(ModelSpec) if f.name not in _OPTIONAL_SPEC_FIELDS}}
_TOP_FIELDS = {"model": dict, "method": dict, "prune_layers": list, "dtype": str, "segments": list,
               "graphs": dict, "files": dict}
_METHOD_FIELDS = {"method", "budget", "variant", "scale", "bias", "lam", "reduction", "K", "R", "prune_layers",
                  "recycle"}  # SparseVLMConfig's fields


def _type_name(kind: type) -> str:
    return {dict: "an object", list: "a list", str: "a string", int: "an integer"}[kind]


def _require(value, kind: type, field: str, path: Path):
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        got = "missing" if value is None else f"{type(value).__name__} {value!r}"[:80]
        raise ArtifactError(f"artifact: {path}: {field} must be {_type_name(kind)} ({got})")
    return value


def check_shape(manifest: dict, path: Path) -> None:
    """The manifest has every field a runtime reads, with the right JSON type."""
    for field, kind in _TOP_FIELDS.items():
        _require(manifest.get(field), kind, field, path)
    for field, kind in _MODEL_FIELDS.items():
        _require(manifest["model"].get(field), kind, f"model.{field}", path)
    for field, kind in _OPTIONAL_SPEC_FIELDS.items():
        if manifest["model"].get(field) is not None:
            _require(manifest["model"][field], kind, f"model.{field}", path)
    unknown = sorted(set(manifest["method"]) - _METHOD_FIELDS)
    if unknown:
        raise ArtifactError(f"artifact: {path}: method has unknown field(s) {', '.join(unknown)}; "
                            f"expected only {', '.join(sorted(_METHOD_FIELDS))}")
    for number, segment in enumerate(manifest["segments"]):
        where = f"segments[{number}]"
        _require(segment, dict, where, path)
        _require(segment.get("index"), int, f"{where}.index", path)
        graph = _require(segment.get("graph"), str, f"{where}.graph", path)
        if graph not in manifest["graphs"]:
            raise ArtifactError(f"artifact: {path}: {where}.graph names {graph!r}, which is not in graphs")
        if segment.get("profile_dim") is not None:
            _require(segment["profile_dim"], str, f"{where}.profile_dim", path)
    for name, graph in manifest["graphs"].items():
        where = f"graphs.{name}"
        _require(graph, dict, where, path)
        _require(graph.get("file"), str, f"{where}.file", path)
        for number, profile in enumerate(_require(graph.get("profiles"), list, f"{where}.profiles", path)):
            for dim, bounds in _require(profile, dict, f"{where}.profiles[{number}]", path).items():
                if not (isinstance(bounds, list) and len(bounds) == 3 and all(isinstance(b, int) for b in bounds)
                        and 0 <= bounds[0] <= bounds[1] <= bounds[2]):
                    raise ArtifactError(f"artifact: {path}: {where}.profiles[{number}].{dim} is {bounds!r}; "
                                        "expected [min, opt, max] integers with min <= opt <= max")
    for name, entry in manifest["files"].items():
        _require(entry, dict, f"files.{name}", path)
        _require(entry.get("sha256"), str, f"files.{name}.sha256", path)
        _require(entry.get("bytes"), int, f"files.{name}.bytes", path)
