"""Loading an exported artifact: manifest checks, graph paths, the method plan, processor."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sparsevlm.export.manifest import MANIFEST, ArtifactError, read_manifest
from sparsevlm.methods.config import ConfigError, PrunePlan, SparseVLMConfig, resolve_for_spec
from sparsevlm.methods.spec import ModelSpec


@dataclass
class Artifact:
    root: Path
    manifest: dict
    plan: PrunePlan

    @classmethod
    def load(cls, path: str | Path, verify_files: bool = True) -> "Artifact":
        root = Path(path)
        manifest = read_manifest(root, verify_files=verify_files)
        spec = ModelSpec.from_json(manifest["model"])
        try:
            plan = resolve_for_spec(SparseVLMConfig.from_dict(manifest["method"]), spec)
        except (ConfigError, TypeError) as error:
            raise ArtifactError(f"artifact: {root / MANIFEST}: method {manifest['method']} is not a valid "
                                f"method setting ({error})") from None
        if list(plan.prune_layers) != manifest["prune_layers"]:
            raise ArtifactError(f"artifact: {root / MANIFEST}: prune_layers {manifest['prune_layers']} do not match "
                                f"its method, which prunes at {list(plan.prune_layers)}")
        return cls(root, manifest, plan)

    @property
    def spec(self) -> ModelSpec:
        """The model's facts, as the export wrote them (the manifest's `model` object)."""
        return ModelSpec.from_json(self.manifest["model"])

    def graph_path(self, name: str) -> Path:
        try:
            return self.root / self.manifest["graphs"][name]["file"]
        except KeyError:
            raise ArtifactError(f"artifact: {self.root} has no graph {name!r}") from None

    def processor(self):
        from sparsevlm.methods.loading import load_processor
        sub = self.manifest["model"].get("processor")
        location = self.root / sub if sub else self.manifest["model"]["source"]
        return load_processor(str(location), self.manifest["model"].get("model_type"))
