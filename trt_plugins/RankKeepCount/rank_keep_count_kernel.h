// Device entry point of RankKeepCount (no TensorRT types: see ../common/host_device.h).
#pragma once

#include "rank_keep_count.h"

#include <cuda_runtime_api.h>

namespace sparsevlm
{

// rater_attention [B, T, V] of `type`; rater_mask int32 [B, T]; visual_valid int32 [B, V];
// outputs rank and keep_count int64 [B]. `workspace` holds rankkeep::workspaceSize(shape)
// bytes. Asynchronous on `stream`.
cudaError_t launchRankKeepCount(ElementType type, void const* attention, int32_t const* raters,
    int32_t const* visualValid, int64_t* rank, int64_t* keep, rankkeep::Shape const& shape,
    rankkeep::RuleParams const& params, void* workspace, cudaStream_t stream);

} // namespace sparsevlm
