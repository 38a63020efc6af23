"""sparsevlm.runtime.triton: serving exported artifacts on Triton Inference Server (README.md)."""
