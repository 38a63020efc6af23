"""sparsevlm.methods: SparseVLM, FasterVLM and FastV in PyTorch, the reference every stage shares."""

from .config import ConfigError, SparseVLMConfig, resolve
from .generation import GenerationOutput, InputError, SamplingParams
from .model import SparseLlava

__all__ = ["ConfigError", "GenerationOutput", "InputError", "SamplingParams", "SparseLlava", "SparseVLMConfig", "resolve"]
