"""sparsevlm.export: ONNX export of the sparsified model (`sparsevlm-export`)."""

from .exporter import export, export_artifact, main

__all__ = ["export", "export_artifact", "main"]
