// TopKTokenSelect as a TensorRT IPluginV3: tokens [B, N, D], scores [B, N] -> selected
// [B, k, D], indices int64 [B, k]. Contract: README.md next to this file, export/OPS.md.
#include "../common/plugin_common.h"
#include "topk_token_select_kernel.h"

#include <memory>
#include <string_view>

using namespace nvinfer1;

namespace sparsevlm
{
namespace
{

constexpr char const* kName = "TopKTokenSelect";

class TopKTokenSelectPlugin : public PluginBase
{
public:
    explicit TopKTokenSelectPlugin(int32_t k)
        : mK(k)
    {
    }

    IPluginV3* clone() noexcept override
    {
        return new (std::nothrow) TopKTokenSelectPlugin(mK);
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
        if (nbInputs != 2 || nbOutputs != 2)
        {
            return -1;
        }
        outputTypes[0] = inputTypes[0];
        outputTypes[1] = DataType::kINT64;
        return 0;
    }

    int32_t getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const*, int32_t, DimsExprs* outputs,
        int32_t nbOutputs, IExprBuilder& exprBuilder) noexcept override
    {
        if (nbInputs != 2 || nbOutputs != 2 || inputs[0].nbDims != 3 || inputs[1].nbDims != 2)
        {
            logError("TopKTokenSelect: expects tokens [B, N, D] and scores [B, N]");
            return -1;
        }
        IDimensionExpr const* k = exprBuilder.constant(mK);
        outputs[0].nbDims = 3;
        outputs[0].d[0] = inputs[0].d[0];
        outputs[0].d[1] = k;
        outputs[0].d[2] = inputs[0].d[2];
        outputs[1].nbDims = 2;
        outputs[1].d[0] = inputs[0].d[0];
        outputs[1].d[1] = k;
        return 0;
    }

    // Positions: 0 tokens, 1 scores, 2 selected (all T), 3 indices (int64).
    bool supportsFormatCombination(
        int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t nbOutputs) noexcept override
    {
        if (nbInputs != 2 || nbOutputs != 2 || pos < 0 || pos > 3 || inOut[pos].desc.format != TensorFormat::kLINEAR)
        {
            return false;
        }
        DataType const type = inOut[pos].desc.type;
        if (pos == 0)
        {
            return type == DataType::kFLOAT || type == DataType::kHALF;
        }
        if (pos == 3)
        {
            return type == DataType::kINT64;
        }
        return type == inOut[0].desc.type;
    }

    // What can really fail is a runtime N below k (the outputs need k of the N slots): a profile
    // whose largest N is below k, or a static N below k. A profile with min N < k <= max N is
    // accepted; onShapeChange then refuses each call whose N is below k.
    int32_t configurePlugin(DynamicPluginTensorDesc const* in, int32_t nbInputs, DynamicPluginTensorDesc const*,
        int32_t nbOutputs) noexcept override
    {
        if (!configuredShapesValid(in, nbInputs, nbOutputs))
        {
            return -1;
        }
        int64_t const largestN = in[0].max.nbDims == 3 ? in[0].max.d[1] : -1;
        if (largestN >= 0 && largestN < mK)
        {
            logError("TopKTokenSelect: k = " + std::to_string(mK) + " exceeds the largest token count N = "
                + std::to_string(largestN) + " of the profile");
            return -1;
        }
        return 0;
    }

    bool checkShapes(Dims const* in, int32_t nbInputs) const noexcept override
    {
        if (nbInputs != 2 || !checkRanks(kName, in, 2, {3, 2}, {"tokens", "scores"}))
        {
            return false;
        }
        Dims const& tokens = in[0];
        Dims const& scores = in[1];
        if (knownMismatch(scores.d[0], tokens.d[0]) || knownMismatch(scores.d[1], tokens.d[1]))
        {
            logError("TopKTokenSelect: scores must be [B, N] for tokens [B, N, D], got [" + std::to_string(scores.d[0])
                + ", " + std::to_string(scores.d[1]) + "] for [" + std::to_string(tokens.d[0]) + ", "
                + std::to_string(tokens.d[1]) + ", " + std::to_string(tokens.d[2]) + "]");
            return false;
        }
        if (tokens.d[1] >= 0 && tokens.d[1] < mK)
        {
            logError("TopKTokenSelect: k = " + std::to_string(mK) + " exceeds the token count N = "
                + std::to_string(tokens.d[1]));
            return false;
        }
        return true;
    }

    size_t getWorkspaceSize(DynamicPluginTensorDesc const* inputs, int32_t, DynamicPluginTensorDesc const*,
        int32_t) const noexcept override
    {
        return static_cast<size_t>(topk::workspaceSize(inputs[0].max.d[0], inputs[0].max.d[1]));
    }

    int32_t enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const*, void const* const* inputs,
        void* const* outputs, void* workspace, cudaStream_t stream) noexcept override
    {
        // onShapeChange has refused an N below k; the launcher refuses it as well.
        Dims const& tokens = inputDesc[0].dims;
        cudaError_t const status = launchTopKTokenSelect(elementType(inputDesc[0].type), inputs[0], inputs[1],
            outputs[0], static_cast<int64_t*>(outputs[1]), tokens.d[0], tokens.d[1], tokens.d[2], mK, workspace,
            stream);
        if (status != cudaSuccess)
        {
            logError(std::string("TopKTokenSelect: kernel launch failed: ") + cudaGetErrorString(status));
            return -1;
        }
        return 0;
    }

    PluginFieldCollection const* getFieldsToSerialize() noexcept override
    {
        return serializedFields({PluginField("k", &mK, PluginFieldType::kINT32, 1)});
    }

private:
    int32_t mK;
};

class TopKTokenSelectCreator : public CreatorBase
{
public:
    TopKTokenSelectCreator()
        : CreatorBase({PluginField("k", nullptr, PluginFieldType::kINT32, 1)})
    {
    }
    char const* getPluginName() const noexcept override
    {
        return kName;
    }

    IPluginV3* createPlugin(char const*, PluginFieldCollection const* fc, TensorRTPhase) noexcept override
    {
        int64_t k = -1;
        for (int32_t i = 0; fc != nullptr && i < fc->nbFields; ++i)
        {
            if (std::string_view(fc->fields[i].name) == "k" && !readInt(fc->fields[i], k))
            {
                return nullptr;
            }
        }
        if (k < 0 || k > INT32_MAX)
        {
            logError("TopKTokenSelect: attribute 'k' is required and must be in [0, N]");
            return nullptr;
        }
        return new (std::nothrow) TopKTokenSelectPlugin(static_cast<int32_t>(k));
    }
};

} // namespace

IPluginCreatorV3One* topKTokenSelectCreator() noexcept
{
    static TopKTokenSelectCreator creator;
    return &creator;
}

} // namespace sparsevlm
