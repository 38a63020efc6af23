// TokenPrune as a TensorRT IPluginV3. Inputs: visual [B, V, D], scores [B, V], visual_valid
// int32 [B, V], keep_count int64 [B], merged [B, C, D], merged_valid int32 [B, C], out_width
// [W] (int64, int32, float or half; only its length is read). Outputs: pruned [B, W, D],
// pruned_valid int32 [B, W], source_index int64 [B, W]. Contract: README.md next to this file, export/OPS.md.
#include "../common/plugin_common.h"
#include "token_prune_kernel.h"

#include <memory>

using namespace nvinfer1;

namespace sparsevlm
{
namespace
{

constexpr char const* kName = "TokenPrune";
enum Input : int32_t
{
    kVisual,
    kScores,
    kVisualValid,
    kKeepCount,
    kMerged,
    kMergedValid,
    kOutWidth,
    kNbInputs
};
enum Output : int32_t
{
    kPruned,
    kPrunedValid,
    kSourceIndex,
    kNbOutputs
};

class TokenPrunePlugin : public PluginBase
{
public:
    IPluginV3* clone() noexcept override
    {
        return new (std::nothrow) TokenPrunePlugin();
    }
    char const* getPluginName() const noexcept override
    {
        return kName;
    }
    int32_t getNbOutputs() const noexcept override
    {
        return kNbOutputs;
    }

    int32_t getOutputDataTypes(
        DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes, int32_t nbInputs) const noexcept override
    {
        if (nbInputs != kNbInputs || nbOutputs != kNbOutputs)
        {
            return -1;
        }
        outputTypes[kPruned] = inputTypes[kVisual];
        outputTypes[kPrunedValid] = DataType::kINT32;
        outputTypes[kSourceIndex] = DataType::kINT64;
        return 0;
    }

    // W is the length of out_width: the runtime picks W (and with it the profile) per call.
    int32_t getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const*, int32_t, DimsExprs* outputs,
        int32_t nbOutputs, IExprBuilder&) noexcept override
    {
        if (nbInputs != kNbInputs || nbOutputs != kNbOutputs || inputs[kVisual].nbDims != 3
            || inputs[kOutWidth].nbDims != 1)
        {
            logError("TokenPrune: expects visual [B, V, D] and out_width [W] among its 7 inputs");
            return -1;
        }
        IDimensionExpr const* batch = inputs[kVisual].d[0];
        IDimensionExpr const* width = inputs[kOutWidth].d[0];
        outputs[kPruned].nbDims = 3;
        outputs[kPruned].d[0] = batch;
        outputs[kPruned].d[1] = width;
        outputs[kPruned].d[2] = inputs[kVisual].d[2];
        for (int32_t o : {kPrunedValid, kSourceIndex})
        {
            outputs[o].nbDims = 2;
            outputs[o].d[0] = batch;
            outputs[o].d[1] = width;
        }
        return 0;
    }

    bool supportsFormatCombination(
        int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t nbOutputs) noexcept override
    {
        if (nbInputs != kNbInputs || nbOutputs != kNbOutputs || pos < 0 || pos >= kNbInputs + kNbOutputs
            || inOut[pos].desc.format != TensorFormat::kLINEAR)
        {
            return false;
        }
        DataType const type = inOut[pos].desc.type;
        switch (pos)
        {
        case kVisual: return type == DataType::kFLOAT || type == DataType::kHALF;
        case kScores:
        case kMerged:
        case kNbInputs + kPruned: return type == inOut[kVisual].desc.type;
        case kVisualValid:
        case kMergedValid:
        case kNbInputs + kPrunedValid: return type == DataType::kINT32; // masks: int32 0/1
        case kKeepCount:
        case kNbInputs + kSourceIndex: return type == DataType::kINT64;
        case kOutWidth:
            return type == DataType::kINT64 || type == DataType::kINT32 || type == DataType::kFLOAT
                || type == DataType::kHALF;
        default: return false;
        }
    }

    int32_t configurePlugin(DynamicPluginTensorDesc const* in, int32_t nbInputs, DynamicPluginTensorDesc const*,
        int32_t nbOutputs) noexcept override
    {
        return configuredShapesValid(in, nbInputs, nbOutputs) ? 0 : -1;
    }

    bool checkShapes(Dims const* in, int32_t nbInputs) const noexcept override
    {
        if (nbInputs != kNbInputs
            || !checkRanks(kName, in, kNbInputs, {3, 2, 2, 1, 3, 2, 1},
                {"visual", "scores", "visual_valid", "keep_count", "merged", "merged_valid", "out_width"}))
        {
            return false;
        }
        Dims const& visual = in[kVisual];
        Dims const& merged = in[kMerged];
        bool const batchMismatch = knownMismatch(in[kScores].d[0], visual.d[0])
            || knownMismatch(in[kVisualValid].d[0], visual.d[0]) || knownMismatch(in[kKeepCount].d[0], visual.d[0])
            || knownMismatch(merged.d[0], visual.d[0]) || knownMismatch(in[kMergedValid].d[0], visual.d[0]);
        bool const widthMismatch = knownMismatch(in[kScores].d[1], visual.d[1])
            || knownMismatch(in[kVisualValid].d[1], visual.d[1]) || knownMismatch(in[kMergedValid].d[1], merged.d[1]);
        if (batchMismatch || widthMismatch || knownMismatch(merged.d[2], visual.d[2]))
        {
            logError("TokenPrune: inputs must share B, scores/visual_valid must be [B, V], merged [B, C, D] with "
                     "the visual D, merged_valid [B, C]");
            return false;
        }
        if (visual.d[2] == 0)
        {
            logError("TokenPrune: the hidden size D must be at least 1");
            return false;
        }
        return true;
    }

    size_t getWorkspaceSize(DynamicPluginTensorDesc const* inputs, int32_t, DynamicPluginTensorDesc const*,
        int32_t) const noexcept override
    {
        return static_cast<size_t>(prune::workspaceSize(inputs[kVisual].max.d[0], inputs[kVisual].max.d[1]));
    }

    int32_t enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const*, void const* const* inputs,
        void* const* outputs, void* workspace, cudaStream_t stream) noexcept override
    {
        Dims const& visual = inputDesc[kVisual].dims;
        prune::Shape const shape{
            visual.d[0], visual.d[1], inputDesc[kMerged].dims.d[1], visual.d[2], inputDesc[kOutWidth].dims.d[0]};
        cudaError_t const status = launchTokenPrune(elementType(inputDesc[kVisual].type), inputs[kVisual],
            inputs[kScores], static_cast<int32_t const*>(inputs[kVisualValid]),
            static_cast<int64_t const*>(inputs[kKeepCount]), inputs[kMerged],
            static_cast<int32_t const*>(inputs[kMergedValid]), outputs[kPruned],
            static_cast<int32_t*>(outputs[kPrunedValid]),
            static_cast<int64_t*>(outputs[kSourceIndex]), shape, workspace, stream);
        if (status != cudaSuccess)
        {
            logError(std::string("TokenPrune: kernel launch failed: ") + cudaGetErrorString(status));
            return -1;
        }
        return 0;
    }

    PluginFieldCollection const* getFieldsToSerialize() noexcept override
    {
        return serializedFields({}); // no attributes
    }
};

class TokenPruneCreator : public CreatorBase
{
public:
    TokenPruneCreator()
        : CreatorBase({})
    {
    }
    char const* getPluginName() const noexcept override
    {
        return kName;
    }
    IPluginV3* createPlugin(char const*, PluginFieldCollection const*, TensorRTPhase) noexcept override
    {
        return new (std::nothrow) TokenPrunePlugin();
    }
};

} // namespace

IPluginCreatorV3One* tokenPruneCreator() noexcept
{
    static TokenPruneCreator creator;
    return &creator;
}

} // namespace sparsevlm
