// Device entry point of TokenRecycle (no TensorRT types: see ../common/host_device.h).
#pragma once

#include "token_recycle.h"

#include <cuda_runtime_api.h>

namespace sparsevlm
{

// visual [B, V, D], scores [B, V] of `type`; visual_valid bool [B, V]; keep_count int64 [B];
// outputs merged [B, C, D] of `type` and merged_valid bool [B, C], C = shape.clusterBound().
// `workspace` holds recycle::workspaceSize(shape) bytes. Asynchronous on `stream`.
cudaError_t launchTokenRecycle(ElementType type, void const* visual, void const* scores, bool const* visualValid,
    int64_t const* keepCount, void* merged, bool* mergedValid, recycle::Shape const& shape, void* workspace,
    cudaStream_t stream);

} // namespace sparsevlm
