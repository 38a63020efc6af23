"""sparsevlm.runtime: run exported artifacts (torch / onnxruntime / tensorrt) and `sparsevlm-run`."""

from sparsevlm.methods.generation import InputError

from .pipeline import Pipeline, RunOutput, load_image
from .profiles import ProfileError, select_profile

__all__ = ["InputError", "Pipeline", "ProfileError", "RunOutput", "load_image", "select_profile"]
