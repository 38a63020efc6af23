"""sparsevlm-trt: deployable visual-token pruning (SparseVLM, FasterVLM, FastV) for LLaVA."""

__version__ = "0.1.0"
