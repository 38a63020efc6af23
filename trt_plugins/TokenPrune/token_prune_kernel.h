// Device entry point of TokenPrune (no TensorRT types: see ../common/host_device.h).
#pragma once

#include "token_prune.h"

#include <cuda_runtime_api.h>

namespace sparsevlm
{

// visual [B, V, D], scores [B, V], merged [B, C, D] of `type`; visual_valid int32 [B, V];
// keep_count int64 [B]; merged_valid int32 [B, C]; outputs pruned [B, W, D] of `type`,
// pruned_valid int32 [B, W], source_index int64 [B, W]. `workspace` holds
// prune::workspaceSize(B, V) bytes. Asynchronous on `stream`.
cudaError_t launchTokenPrune(ElementType type, void const* visual, void const* scores, int32_t const* visualValid,
    int64_t const* keepCount, void const* merged, int32_t const* mergedValid, void* pruned, int32_t* prunedValid,
    int64_t* sourceIndex, prune::Shape const& shape, void* workspace, cudaStream_t stream);

} // namespace sparsevlm
