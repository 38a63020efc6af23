"""sparsevlm.runtime"""
