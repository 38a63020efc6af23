// TokenRecycle as a TensorRT IPluginV3. Inputs: visual [B, V, D], scores [B, V],
// visual_valid int32 [B, V], keep_count int64 [B]. Outputs: merged [B, C, D], merged_valid
// int32 [B, C], C = pool(V) // cluster_divisor + 1 with pool(V) = (candidate_percent * V) //
// 100 + 1 (also for V = 0: C = 1). Contract: README.md next to this file, export/OPS.md.
#include "../common/plugin_common.h"
#include "token_recycle_kernel.h"

#include <memory>
#include <string_view>

using namespace nvinfer1;

namespace sparsevlm
{
namespace
{

constexpr char const* kName = "TokenRecycle";
constexpr int64_t kDefaultCandidatePercent = 30; // SparseVLM's tau = 0.3
constexpr int64_t kDefaultClusterDivisor = 10;

class TokenRecyclePlugin : public PluginBase
{
public:
    TokenRecyclePlugin(int32_t candidatePercent, int32_t clusterDivisor)
        : mCandidatePercent(candidatePercent)
        , mClusterDivisor(clusterDivisor)
    {
    }

    IPluginV3* clone() noexcept override
    {
        return new (std::nothrow) TokenRecyclePlugin(mCandidatePercent, mClusterDivisor);
    }
    char const* getPluginName() const noexcept override
    {
        return kName;
    }
    int32_t getNbOutputs() const noexcept override
    {
        return 2;
    }

    int32_t getOutputDataTypes(
        DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes, int32_t nbInputs) const noexcept override
    {
        if (nbInputs != 4 || nbOutputs != 2)
        {
            return -1;
        }
        outputTypes[0] = inputTypes[0];
        outputTypes[1] = DataType::kINT32;
        return 0;
    }

    int32_t getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const*, int32_t, DimsExprs* outputs,
        int32_t nbOutputs, IExprBuilder& exprBuilder) noexcept override
    {
        if (nbInputs != 4 || nbOutputs != 2 || inputs[0].nbDims != 3)
        {
            logError("TokenRecycle: expects visual [B, V, D] and 4 inputs");
            return -1;
        }
        IDimensionExpr const* numVisual = inputs[0].d[1];
        IDimensionExpr const* clusters = nullptr;
        if (numVisual->isConstant())
        {
            recycle::Shape const shape{1, numVisual->getConstantValue(), 1, mCandidatePercent, mClusterDivisor};
            clusters = exprBuilder.constant(shape.clusterBound());
        }
        else // the same formula, as an expression
        {
            auto const op = [&](DimensionOperation o, IDimensionExpr const* a, int64_t b)
            { return exprBuilder.operation(o, *a, *exprBuilder.constant(b)); };
            IDimensionExpr const* pool = op(DimensionOperation::kSUM,
                op(DimensionOperation::kFLOOR_DIV, op(DimensionOperation::kPROD, numVisual, mCandidatePercent), 100),
                1);
            clusters = op(DimensionOperation::kSUM, op(DimensionOperation::kFLOOR_DIV, pool, mClusterDivisor), 1);
        }
        outputs[0].nbDims = 3;
        outputs[0].d[0] = inputs[0].d[0];
        outputs[0].d[1] = clusters;
        outputs[0].d[2] = inputs[0].d[2];
        outputs[1].nbDims = 2;
        outputs[1].d[0] = inputs[0].d[0];
        outputs[1].d[1] = clusters;
        return 0;
    }

    // Positions: 0 visual, 1 scores (T); 2 visual_valid (int32); 3 keep_count (int64);
    // 4 merged (T); 5 merged_valid (int32).
    bool supportsFormatCombination(
        int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t nbOutputs) noexcept override
    {
        if (nbInputs != 4 || nbOutputs != 2 || pos < 0 || pos > 5 || inOut[pos].desc.format != TensorFormat::kLINEAR)
        {
            return false;
        }
        DataType const type = inOut[pos].desc.type;
        switch (pos)
        {
        case 0: return type == DataType::kFLOAT || type == DataType::kHALF;
        case 1:
        case 4: return type == inOut[0].desc.type;
        case 2:
        case 5: return type == DataType::kINT32; // masks: int32 0/1
        default: return type == DataType::kINT64;
        }
    }

    int32_t configurePlugin(DynamicPluginTensorDesc const* in, int32_t nbInputs, DynamicPluginTensorDesc const*,
        int32_t nbOutputs) noexcept override
    {
        return configuredShapesValid(in, nbInputs, nbOutputs) ? 0 : -1;
    }

    bool checkShapes(Dims const* in, int32_t nbInputs) const noexcept override
    {
        if (nbInputs != 4
            || !checkRanks(kName, in, 4, {3, 2, 2, 1}, {"visual", "scores", "visual_valid", "keep_count"}))
        {
            return false;
        }
        Dims const& visual = in[0];
        if (knownMismatch(in[1].d[0], visual.d[0]) || knownMismatch(in[1].d[1], visual.d[1])
            || knownMismatch(in[2].d[0], visual.d[0]) || knownMismatch(in[2].d[1], visual.d[1])
            || knownMismatch(in[3].d[0], visual.d[0]))
        {
            logError("TokenRecycle: scores and visual_valid must be [B, V], keep_count [B], for visual [B, V, D]");
            return false;
        }
        return true;
    }

    size_t getWorkspaceSize(DynamicPluginTensorDesc const* inputs, int32_t, DynamicPluginTensorDesc const*,
        int32_t) const noexcept override
    {
        Dims const& largest = inputs[0].max;
        recycle::Shape const shape{largest.d[0], largest.d[1], largest.d[2], mCandidatePercent, mClusterDivisor};
        return static_cast<size_t>(recycle::workspaceSize(shape));
    }

    int32_t enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const*, void const* const* inputs,
        void* const* outputs, void* workspace, cudaStream_t stream) noexcept override
    {
        Dims const& visual = inputDesc[0].dims;
        recycle::Shape const shape{visual.d[0], visual.d[1], visual.d[2], mCandidatePercent, mClusterDivisor};
        cudaError_t const status = launchTokenRecycle(elementType(inputDesc[0].type), inputs[0], inputs[1],
            static_cast<int32_t const*>(inputs[2]), static_cast<int64_t const*>(inputs[3]), outputs[0],
            static_cast<int32_t*>(outputs[1]), shape, workspace, stream);
        if (status != cudaSuccess)
        {
            logError(std::string("TokenRecycle: kernel launch failed: ") + cudaGetErrorString(status));
            return -1;
        }
        return 0;
    }

    PluginFieldCollection const* getFieldsToSerialize() noexcept override
    {
        return serializedFields({PluginField("candidate_percent", &mCandidatePercent, PluginFieldType::kINT32, 1),
            PluginField("cluster_divisor", &mClusterDivisor, PluginFieldType::kINT32, 1)});
    }

private:
    int32_t mCandidatePercent;
    int32_t mClusterDivisor;
};

class TokenRecycleCreator : public CreatorBase
{
public:
    TokenRecycleCreator()
        : CreatorBase({PluginField("candidate_percent", nullptr, PluginFieldType::kINT32, 1),
            PluginField("cluster_divisor", nullptr, PluginFieldType::kINT32, 1)})
    {
    }
    char const* getPluginName() const noexcept override
    {
        return kName;
    }

    IPluginV3* createPlugin(char const*, PluginFieldCollection const* fc, TensorRTPhase) noexcept override
    {
        int64_t candidatePercent = kDefaultCandidatePercent;
        int64_t clusterDivisor = kDefaultClusterDivisor;
        for (int32_t i = 0; fc != nullptr && i < fc->nbFields; ++i)
        {
            std::string_view const name(fc->fields[i].name);
            bool const ok = name == "candidate_percent" ? readInt(fc->fields[i], candidatePercent)
                : name == "cluster_divisor"             ? readInt(fc->fields[i], clusterDivisor)
                                                        : true;
            if (!ok)
            {
                return nullptr;
            }
        }
        // Outside these ranges the pool could exceed the deleted tokens (percent >= 100) or
        // the clusters exceed the pool (divisor 1), which the contract does not define.
        if (candidatePercent < 0 || candidatePercent > 99 || clusterDivisor < 2 || clusterDivisor > INT32_MAX)
        {
            logError("TokenRecycle: candidate_percent must be in [0, 99] and cluster_divisor >= 2, got "
                + std::to_string(candidatePercent) + " and " + std::to_string(clusterDivisor));
            return nullptr;
        }
        return new (std::nothrow)
            TokenRecyclePlugin(static_cast<int32_t>(candidatePercent), static_cast<int32_t>(clusterDivisor));
    }
};

} // namespace

IPluginCreatorV3One* tokenRecycleCreator() noexcept
{
    static TokenRecycleCreator creator;
    return &creator;
}

} // namespace sparsevlm
