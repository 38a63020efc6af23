"""The runtime's view of the optimization-profile contract, which lives in
`sparsevlm.methods.profiles` (one rule for the runtime, the TensorRT executor and
calibration's pricing). Re-exported here for the runtime's users."""

from sparsevlm.methods.profiles import ProfileChoice, ProfileError, SegmentProfiles, select_profile

__all__ = ["ProfileChoice", "ProfileError", "SegmentProfiles", "select_profile"]
