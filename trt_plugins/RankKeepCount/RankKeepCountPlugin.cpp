// RankKeepCount as a TensorRT IPluginV3. Inputs: rater_attention [B, T, V] (float32, or
// float16), rater_mask int32 [B, T], visual_valid int32 [B, V]. Outputs: rank and keep_count,
// int64 [B]. Contract: README.md next to this file, export/OPS.md.
#include "../common/plugin_common.h"
#include "rank_keep_count_kernel.h"

#include <memory>
#include <string_view>

using namespace nvinfer1;

namespace sparsevlm
{
namespace
{

constexpr char const* kName = "RankKeepCount";

char const* ruleName(rankkeep::Rule rule)
{
    return rule == rankkeep::Rule::kV10 ? "v1.0" : "paper";
}

class RankKeepCountPlugin : public PluginBase
{
public:
    explicit RankKeepCountPlugin(rankkeep::RuleParams const& params)
        : mParams(params)
        , mRuleName(ruleName(params.rule))
    {
    }

    IPluginV3* clone() noexcept override
    {
        return new (std::nothrow) RankKeepCountPlugin(mParams);
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
        DataType* outputTypes, int32_t nbOutputs, DataType const*, int32_t nbInputs) const noexcept override
    {
        if (nbInputs != 3 || nbOutputs != 2)
        {
            return -1;
        }
        outputTypes[0] = DataType::kINT64;
        outputTypes[1] = DataType::kINT64;
        return 0;
    }

    int32_t getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const*, int32_t, DimsExprs* outputs,
        int32_t nbOutputs, IExprBuilder&) noexcept override
    {
        if (nbInputs != 3 || nbOutputs != 2 || inputs[0].nbDims != 3)
        {
            logError("RankKeepCount: expects rater_attention [B, T, V], rater_mask, visual_valid");
            return -1;
        }
        for (int32_t o = 0; o < 2; ++o)
        {
            outputs[o].nbDims = 1;
            outputs[o].d[0] = inputs[0].d[0];
        }
        return 0;
    }

    // Positions: 0 rater_attention (float32/float16); 1, 2 masks (int32 0/1); 3, 4 outputs (int64).
    bool supportsFormatCombination(
        int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t nbOutputs) noexcept override
    {
        if (nbInputs != 3 || nbOutputs != 2 || pos < 0 || pos > 4 || inOut[pos].desc.format != TensorFormat::kLINEAR)
        {
            return false;
        }
        DataType const type = inOut[pos].desc.type;
        if (pos == 0)
        {
            return type == DataType::kFLOAT || type == DataType::kHALF;
        }
        return type == (pos <= 2 ? DataType::kINT32 : DataType::kINT64);
    }

    int32_t configurePlugin(DynamicPluginTensorDesc const* in, int32_t nbInputs, DynamicPluginTensorDesc const*,
        int32_t nbOutputs) noexcept override
    {
        return configuredShapesValid(in, nbInputs, nbOutputs) ? 0 : -1;
    }

    bool checkShapes(Dims const* in, int32_t nbInputs) const noexcept override
    {
        if (nbInputs != 3 || !checkRanks(kName, in, 3, {3, 2, 2}, {"rater_attention", "rater_mask", "visual_valid"}))
        {
            return false;
        }
        Dims const& attention = in[0];
        if (knownMismatch(in[1].d[0], attention.d[0]) || knownMismatch(in[1].d[1], attention.d[1])
            || knownMismatch(in[2].d[0], attention.d[0]) || knownMismatch(in[2].d[1], attention.d[2]))
        {
            logError("RankKeepCount: rater_mask must be [B, T] and visual_valid [B, V] for rater_attention [B, T, V]");
            return false;
        }
        return true;
    }

    size_t getWorkspaceSize(DynamicPluginTensorDesc const* inputs, int32_t, DynamicPluginTensorDesc const*,
        int32_t) const noexcept override
    {
        Dims const& largest = inputs[0].max;
        return static_cast<size_t>(rankkeep::workspaceSize(rankkeep::Shape{largest.d[0], largest.d[1], largest.d[2]}));
    }

    int32_t enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const*, void const* const* inputs,
        void* const* outputs, void* workspace, cudaStream_t stream) noexcept override
    {
        Dims const& attention = inputDesc[0].dims;
        rankkeep::Shape const shape{attention.d[0], attention.d[1], attention.d[2]};
        cudaError_t const status = launchRankKeepCount(elementType(inputDesc[0].type), inputs[0],
            static_cast<int32_t const*>(inputs[1]), static_cast<int32_t const*>(inputs[2]),
            static_cast<int64_t*>(outputs[0]),
            static_cast<int64_t*>(outputs[1]), shape, mParams, workspace, stream);
        if (status != cudaSuccess)
        {
            logError(std::string("RankKeepCount: kernel launch failed: ") + cudaGetErrorString(status));
            return -1;
        }
        return 0;
    }

    PluginFieldCollection const* getFieldsToSerialize() noexcept override
    {
        return serializedFields({PluginField("rule", mRuleName.c_str(), PluginFieldType::kCHAR,
                                     static_cast<int32_t>(mRuleName.size())),
            PluginField("scale", &mParams.scale, PluginFieldType::kFLOAT64, 1),
            PluginField("bias", &mParams.bias, PluginFieldType::kFLOAT64, 1),
            PluginField("lam", &mParams.lam, PluginFieldType::kFLOAT64, 1)});
    }

private:
    rankkeep::RuleParams mParams;
    std::string mRuleName;
};

class RankKeepCountCreator : public CreatorBase
{
public:
    RankKeepCountCreator()
        : CreatorBase({PluginField("rule", nullptr, PluginFieldType::kCHAR, 0),
            PluginField("scale", nullptr, PluginFieldType::kFLOAT64, 1),
            PluginField("bias", nullptr, PluginFieldType::kFLOAT64, 1),
            PluginField("lam", nullptr, PluginFieldType::kFLOAT64, 1)})
    {
    }
    char const* getPluginName() const noexcept override
    {
        return kName;
    }

    // `rule` is required, and so are the numbers it uses: scale and bias for "v1.0", lam for
    // "paper". A missing one is an error rather than a silent default. The numbers are taken as
    // kFLOAT32 (the ONNX parser's FLOAT) or kFLOAT64, held and serialized as double.
    IPluginV3* createPlugin(char const*, PluginFieldCollection const* fc, TensorRTPhase) noexcept override
    {
        std::string rule;
        rankkeep::RuleParams params{rankkeep::Rule::kV10, 0.0, 0.0, 0.0};
        bool hasScale = false;
        bool hasBias = false;
        bool hasLam = false;
        for (int32_t i = 0; fc != nullptr && i < fc->nbFields; ++i)
        {
            PluginField const& field = fc->fields[i];
            std::string_view const name(field.name);
            bool ok = true;
            if (name == "rule")
            {
                ok = readString(field, rule);
            }
            else if (name == "scale")
            {
                ok = hasScale = readDouble(field, params.scale);
            }
            else if (name == "bias")
            {
                ok = hasBias = readDouble(field, params.bias);
            }
            else if (name == "lam")
            {
                ok = hasLam = readDouble(field, params.lam);
            }
            if (!ok)
            {
                return nullptr;
            }
        }
        if (rule == "v1.0" && hasScale && hasBias)
        {
            params.rule = rankkeep::Rule::kV10;
        }
        else if (rule == "paper" && hasLam)
        {
            params.rule = rankkeep::Rule::kPAPER;
        }
        else
        {
            logError("RankKeepCount: needs rule = \"v1.0\" with scale and bias, or rule = \"paper\" with lam (got "
                "rule '" + rule + "')");
            return nullptr;
        }
        return new (std::nothrow) RankKeepCountPlugin(params);
    }
};

} // namespace

IPluginCreatorV3One* rankKeepCountCreator() noexcept
{
    static RankKeepCountCreator creator;
    return &creator;
}

} // namespace sparsevlm
