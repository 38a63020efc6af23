"""sparsevlm.calibration"""
