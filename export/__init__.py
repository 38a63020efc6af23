"""sparsevlm.export"""
