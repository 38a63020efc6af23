// Device entry point of TokenRecycle (no TensorRT types: see ../common/host_device.h).
#pragma once

#include "token_recycle.h"

#include <cuda_runtime_api.h>

namespace sparsevlm
{

// visual [B, V, D], scores [B, V] of `type`; visual_valid int32 [B, V]; keep_count int64 [B];
// outputs merged [B, C, D] of `type` and merged_valid int32 [B, C], C = shape.clusterBound().
// `workspace` holds recycle::workspaceSize(shape) bytes. Asynchronous on `stream`.
cudaError_t launchTokenRecycle(ElementType type, void const* visual, void const* scores, int32_t const* visualValid,
    int64_t const* keepCount, void* merged, int32_t* mergedValid, recycle::Shape const& shape, void* workspace,
    cudaStream_t stream);

} // namespace sparsevlm
