"""Loading an exported artifact: manifest checks, graph paths, the method plan, processor."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sparsevlm.export.manifest import MANIFEST, ArtifactError, read_manifest
from sparsevlm.methods.config import ConfigError, PrunePlan, SparseVLMConfig, resolve


@dataclass
class Artifact:
    root: Path
    manifest: dict
    plan: PrunePlan

    @classmethod
    def load(cls, path: str | Path, verify_files: bool = True) -> "Artifact":
        root = Path(path)
        manifest = read_manifest(root, verify_files=verify_files)
        model = manifest["model"]
        try:
            plan = resolve(SparseVLMConfig.from_dict(manifest["method"]), model["num_layers"], model["num_visual"])
        except (ConfigError, TypeError) as error:
            raise ArtifactError(f"artifact: {root / MANIFEST}: method {manifest['method']} is not a valid "
                                f"method setting ({error})") from None
        if list(plan.prune_layers) != manifest["prune_layers"]:
            raise ArtifactError(f"artifact: {root / MANIFEST}: prune_layers {manifest['prune_layers']} do not match "
                                f"its method, which prunes at {list(plan.prune_layers)}")
        return cls(root, manifest, plan)

    def graph_path(self, name: str) -> Path:
        try:
            return self.root / self.manifest["graphs"][name]["file"]
        except KeyError:
            raise ArtifactError(f"artifact: {self.root} has no graph {name!r}") from None

    def output_names(self, name: str) -> dict:
        """ONNX output name -> the method's tensor name (`hidden_out` -> `hidden`)."""
        return self.manifest["graphs"][name]["output_names"]

    def processor(self):
        from transformers import AutoProcessor
        sub = self.manifest["model"].get("processor")
        location = self.root / sub if sub else self.manifest["model"]["source"]
        return AutoProcessor.from_pretrained(str(location), trust_remote_code=False)
