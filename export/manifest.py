"""The artifact manifest (`manifest.json`, schema `sparsevlm-artifact/1`): what an export
wrote and everything a runtime needs to run it. Written last, so a directory without a
valid manifest is never an artifact."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

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
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ArtifactError(f"artifact: {path} is not valid JSON ({error})") from None
    schema = manifest.get("schema", "")
    name, _, version = schema.rpartition("/")
    if name != "sparsevlm-artifact" or not version.isdigit():
        raise ArtifactError(f"artifact: {path} has schema {schema!r}; expected {SCHEMA!r}")
    if int(version) > SCHEMA_VERSION:
        raise ArtifactError(f"artifact: {path} uses schema version {version}, newer than this toolkit's "
                            f"{SCHEMA_VERSION}; upgrade sparsevlm-trt or re-export")
    if verify_files:
        for name, entry in manifest.get("files", {}).items():
            file = root / name
            if not file.exists():
                raise ArtifactError(f"artifact: {file} is missing")
            if file.stat().st_size != entry["bytes"] or sha256_file(file) != entry["sha256"]:
                raise ArtifactError(f"artifact: {file} does not match its checksum in {MANIFEST} (corrupted or edited)")
    return manifest
