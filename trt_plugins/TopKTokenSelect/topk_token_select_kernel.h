// Device entry point of TopKTokenSelect (no TensorRT types: see ../common/host_device.h).
#pragma once

#include "topk_token_select.h"

#include <cuda_runtime_api.h>

namespace sparsevlm
{

// tokens [B, N, D] and scores [B, N] of `type`; selected [B, k, D] of `type`; indices int64 [B, k].
// `workspace` holds topk::workspaceSize(B, N) bytes. Asynchronous on `stream`.
cudaError_t launchTopKTokenSelect(ElementType type, void const* tokens, void const* scores, void* selected,
    int64_t* indices, int64_t batch, int64_t numTokens, int64_t dim, int64_t k, void* workspace, cudaStream_t stream);

} // namespace sparsevlm
