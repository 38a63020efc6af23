// CPU harness for libsparsevlm_plugins.so: dlopens the library (no libnvinfer, no GPU),
// calls getCreators and drives every IPluginV3 interface except enqueue:
//   creators (name, version, namespace, field names), createPlugin in both phases (and
//   rejection of bad attributes), capabilities, output types, output shapes through a fake
//   IExprBuilder, supportsFormatCombination, configurePlugin (accepting good and rejecting
//   bad shapes, and a profile only where a runtime shape in it can fail), onShapeChange
//   (accepting consistent and refusing inconsistent runtime shapes), workspace size,
//   getFieldsToSerialize -> RUNTIME createPlugin round trip, clone and attachToContext.
// Usage: sparsevlm_plugin_harness path/to/libsparsevlm_plugins.so
// Prints one line per failed check and a summary "harness: N checks, F failed"; exit 0 iff F == 0.
//
// Shape queries: sparsevlm_plugin_harness path/to/libsparsevlm_plugins.so --output-shapes
// reads one request per stdin line, `<Op> [name=int ...] : <shape> <shape> ...` with shapes
// written `2x10x4` (`-` for a rank-0 shape), and prints for each the plugin's getOutputShapes
// the same way, evaluated with constant and with dynamic input dims (`error` when refused):
// `<constant shapes> | <dynamic shapes>`.
#include <NvInfer.h>

#include <dlfcn.h>

#include <cstdio>
#include <cstring>
#include <deque>
#include <functional>
#include <iostream>
#include <map>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include "check.h"

using namespace nvinfer1;

namespace
{

using sparsevlm_tests::check;
using sparsevlm_tests::gChecks;
using sparsevlm_tests::gFailures;

// --- A fake IExprBuilder: expressions carry a concrete value and whether it is a build-time
// constant, so the plugins' symbolic formulas can be evaluated and checked. ---------------------

class FakeDimensionImpl : public apiv::VDimensionExpr
{
public:
    FakeDimensionImpl(int64_t value, bool constant)
        : value(value)
        , constant(constant)
    {
    }
    bool isConstant() const override
    {
        return constant;
    }
    int64_t getConstantValue() const override
    {
        return constant ? value : INT64_MIN;
    }
    bool isSizeTensor() const override
    {
        return false;
    }
    int64_t value;
    bool constant;
};

class FakeDimension : public IDimensionExpr
{
public:
    FakeDimension(int64_t value, bool constant)
        : impl(value, constant)
    {
        mImpl = &impl;
    }
    FakeDimensionImpl impl;
};

int64_t valueOf(IDimensionExpr const* e)
{
    return static_cast<FakeDimension const*>(e)->impl.value;
}

class FakeExprBuilderImpl : public apiv::VExprBuilder
{
public:
    IDimensionExpr const* make(int64_t value, bool constant)
    {
        dims.emplace_back(value, constant);
        return &dims.back();
    }
    IDimensionExpr const* constant(int64_t value) override
    {
        return make(value, true);
    }
    IDimensionExpr const* operation(DimensionOperation op, IDimensionExpr const& a, IDimensionExpr const& b) override
    {
        int64_t const x = valueOf(&a);
        int64_t const y = valueOf(&b);
        int64_t r = 0;
        switch (op)
        {
        case DimensionOperation::kSUM: r = x + y; break;
        case DimensionOperation::kPROD: r = x * y; break;
        case DimensionOperation::kMAX: r = x > y ? x : y; break;
        case DimensionOperation::kMIN: r = x < y ? x : y; break;
        case DimensionOperation::kSUB: r = x - y; break;
        case DimensionOperation::kEQUAL: r = x == y; break;
        case DimensionOperation::kLESS: r = x < y; break;
        case DimensionOperation::kFLOOR_DIV: r = x / y - ((x % y != 0) && ((x < 0) != (y < 0))); break;
        case DimensionOperation::kCEIL_DIV: r = (x + y - 1) / y; break;
        }
        return make(r, a.isConstant() && b.isConstant());
    }
    IDimensionExpr const* declareSizeTensor(int32_t, IDimensionExpr const&, IDimensionExpr const&) override
    {
        check(false, "no sparsevlm plugin declares a size tensor");
        return make(0, false);
    }
    std::deque<FakeDimension> dims; // deque: stable addresses
};

class FakeExprBuilder : public IExprBuilder
{
public:
    FakeExprBuilder()
    {
        mImpl = &impl;
    }
    FakeExprBuilderImpl impl;
};

// --- Helpers -----------------------------------------------------------------------------------

using Shape = std::vector<int64_t>;

Dims dimsOf(Shape const& shape)
{
    Dims d{};
    d.nbDims = static_cast<int32_t>(shape.size());
    for (size_t i = 0; i < shape.size(); ++i)
    {
        d.d[i] = shape[i];
    }
    return d;
}

// Output shapes for concrete input shapes; `symbolic` makes every input dim a non-constant
// expression (a dynamic dimension), exercising the plugin's formula instead of its constants.
std::vector<Shape> outputShapes(IPluginV3OneBuild* build, std::vector<Shape> const& inputs, bool symbolic, int32_t& status)
{
    FakeExprBuilder builder;
    std::vector<DimsExprs> in(inputs.size());
    for (size_t i = 0; i < inputs.size(); ++i)
    {
        in[i].nbDims = static_cast<int32_t>(inputs[i].size());
        for (size_t j = 0; j < inputs[i].size(); ++j)
        {
            in[i].d[j] = builder.impl.make(inputs[i][j], !symbolic);
        }
    }
    int32_t const nbOutputs = build->getNbOutputs();
    std::vector<DimsExprs> out(static_cast<size_t>(nbOutputs));
    status = build->getOutputShapes(in.data(), static_cast<int32_t>(in.size()), nullptr, 0, out.data(), nbOutputs,
        static_cast<IExprBuilder&>(builder));
    std::vector<Shape> result;
    for (DimsExprs const& o : out)
    {
        Shape s;
        for (int32_t j = 0; status == 0 && j < o.nbDims; ++j)
        {
            s.push_back(valueOf(o.d[j]));
        }
        result.push_back(s);
    }
    return result;
}

std::vector<DynamicPluginTensorDesc> describe(std::vector<Shape> const& shapes, std::vector<DataType> const& types)
{
    std::vector<DynamicPluginTensorDesc> desc(shapes.size());
    for (size_t i = 0; i < shapes.size(); ++i)
    {
        desc[i].desc.dims = dimsOf(shapes[i]);
        desc[i].desc.type = types[i];
        desc[i].desc.format = TensorFormat::kLINEAR;
        desc[i].desc.scale = 1.0F;
        desc[i].min = desc[i].max = desc[i].opt = dimsOf(shapes[i]);
    }
    return desc;
}

std::string shapeText(Shape const& s)
{
    std::string t = "[";
    for (size_t i = 0; i < s.size(); ++i)
    {
        t += (i ? ", " : "") + std::to_string(s[i]);
    }
    return t + "]";
}

// Serialized fields as comparable text: name, type, length and bytes.
std::string fieldsText(PluginFieldCollection const* fc)
{
    std::string t;
    static std::map<PluginFieldType, int> const sizes{{PluginFieldType::kINT32, 4}, {PluginFieldType::kFLOAT32, 4},
        {PluginFieldType::kCHAR, 1}, {PluginFieldType::kINT64, 8}, {PluginFieldType::kFLOAT64, 8}};
    for (int32_t i = 0; fc != nullptr && i < fc->nbFields; ++i)
    {
        PluginField const& f = fc->fields[i];
        t += std::string(f.name) + ":" + std::to_string(static_cast<int>(f.type)) + ":" + std::to_string(f.length) + ":";
        auto const size = sizes.find(f.type);
        unsigned char const* bytes = static_cast<unsigned char const*>(f.data);
        for (int32_t b = 0; size != sizes.end() && bytes != nullptr && b < f.length * size->second; ++b)
        {
            t += std::to_string(bytes[b]) + ",";
        }
        t += ";";
    }
    return t;
}

struct Attribute
{
    std::string name;
    PluginFieldType type;
    std::vector<char> bytes;
    int32_t length;
};

Attribute intField(char const* name, int32_t v)
{
    std::vector<char> b(sizeof v);
    std::memcpy(b.data(), &v, sizeof v);
    return {name, PluginFieldType::kINT32, b, 1};
}
Attribute floatField(char const* name, float v)
{
    std::vector<char> b(sizeof v);
    std::memcpy(b.data(), &v, sizeof v);
    return {name, PluginFieldType::kFLOAT32, b, 1};
}
Attribute doubleField(char const* name, double v)
{
    std::vector<char> b(sizeof v);
    std::memcpy(b.data(), &v, sizeof v);
    return {name, PluginFieldType::kFLOAT64, b, 1};
}
Attribute stringField(char const* name, std::string const& v)
{
    return {name, PluginFieldType::kCHAR, std::vector<char>(v.begin(), v.end()), static_cast<int32_t>(v.size())};
}

IPluginV3* create(IPluginCreatorV3One* creator, std::vector<Attribute> const& attributes, TensorRTPhase phase)
{
    std::vector<PluginField> fields;
    for (Attribute const& a : attributes)
    {
        fields.emplace_back(a.name.c_str(), a.bytes.data(), a.type, a.length);
    }
    PluginFieldCollection fc{static_cast<int32_t>(fields.size()), fields.data()};
    return creator->createPlugin("harness", &fc, phase);
}

// Everything one op is checked with.
struct OpCase
{
    std::string name;
    std::vector<std::string> fieldNames;
    std::vector<Attribute> attributes;                  // valid
    std::vector<std::vector<Attribute>> badAttributes;  // each must be rejected
    std::vector<Shape> inputs;                          // a valid call
    std::vector<DataType> inputTypesFloat;              // with T = float32
    std::vector<DataType> outputTypesFloat;
    std::vector<Shape> expectedOutputs;
    std::vector<std::pair<std::string, std::vector<Shape>>> badInputs; // configurePlugin and onShapeChange reject
    std::vector<std::pair<int32_t, DataType>> badTypes;                 // (position, type) unsupported
    bool halfSupported = true;                                          // T = float16 accepted
    // More (inputs, expected outputs) for getOutputShapes, e.g. edge widths.
    std::vector<std::pair<std::vector<Shape>, std::vector<Shape>>> moreShapes;
};

// Runtime descriptors (what onShapeChange receives) for concrete shapes.
std::vector<PluginTensorDesc> runtimeDescs(std::vector<Shape> const& shapes, std::vector<DataType> const& types)
{
    std::vector<PluginTensorDesc> desc(shapes.size());
    for (size_t i = 0; i < shapes.size(); ++i)
    {
        desc[i].dims = dimsOf(shapes[i]);
        desc[i].type = types[i];
        desc[i].format = TensorFormat::kLINEAR;
        desc[i].scale = 1.0F;
    }
    return desc;
}

std::vector<DataType> withHalf(std::vector<DataType> types)
{
    for (DataType& t : types)
    {
        t = t == DataType::kFLOAT ? DataType::kHALF : t;
    }
    return types;
}

void checkPlugin(IPluginV3* plugin, OpCase const& op, std::string const& label)
{
    auto* core = static_cast<IPluginV3OneCore*>(plugin->getCapabilityInterface(PluginCapabilityType::kCORE));
    auto* build = static_cast<IPluginV3OneBuild*>(plugin->getCapabilityInterface(PluginCapabilityType::kBUILD));
    auto* runtime = static_cast<IPluginV3OneRuntime*>(plugin->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
    check(core && build && runtime, label + ": core, build and runtime capabilities");
    if (!(core && build && runtime))
    {
        return;
    }
    check(op.name == core->getPluginName() && std::string("1") == core->getPluginVersion()
            && std::string("sparsevlm") == core->getPluginNamespace(),
        label + ": name / version / namespace");

    // Output types, for T = float32 and T = float16.
    int32_t const nbOutputs = build->getNbOutputs();
    check(nbOutputs == static_cast<int32_t>(op.outputTypesFloat.size()), label + ": number of outputs");
    for (bool half : {false, true})
    {
        std::vector<DataType> in = half ? withHalf(op.inputTypesFloat) : op.inputTypesFloat;
        std::vector<DataType> want = half ? withHalf(op.outputTypesFloat) : op.outputTypesFloat;
        std::vector<DataType> got(want.size(), DataType::kINT8);
        int32_t const status
            = build->getOutputDataTypes(got.data(), nbOutputs, in.data(), static_cast<int32_t>(in.size()));
        check(status == 0 && got == want, label + ": output types" + (half ? " (float16)" : " (float32)"));
    }

    // Output shapes, with constant and with dynamic input dims.
    std::vector<std::pair<std::vector<Shape>, std::vector<Shape>>> shapeCases{{op.inputs, op.expectedOutputs}};
    shapeCases.insert(shapeCases.end(), op.moreShapes.begin(), op.moreShapes.end());
    for (auto const& [inputs, expected] : shapeCases)
    {
        for (bool symbolic : {false, true})
        {
            int32_t status = -1;
            std::vector<Shape> got = outputShapes(build, inputs, symbolic, status);
            std::string text;
            for (Shape const& s : got)
            {
                text += shapeText(s);
            }
            check(status == 0 && got == expected,
                label + ": output shapes for " + shapeText(inputs[0]) + (symbolic ? " (dynamic dims)" : "") + " got "
                    + text);
        }
    }

    // Formats: the valid combination for float32 and float16, then each bad type.
    for (bool half : {false, true})
    {
        std::vector<DataType> types = op.inputTypesFloat;
        types.insert(types.end(), op.outputTypesFloat.begin(), op.outputTypesFloat.end());
        types = half ? withHalf(types) : types;
        std::vector<Shape> shapes = op.inputs;
        shapes.insert(shapes.end(), op.expectedOutputs.begin(), op.expectedOutputs.end());
        std::vector<DynamicPluginTensorDesc> inOut = describe(shapes, types);
        bool all = true;
        for (int32_t pos = 0; pos < static_cast<int32_t>(inOut.size()); ++pos)
        {
            all = all
                && build->supportsFormatCombination(
                    pos, inOut.data(), static_cast<int32_t>(op.inputs.size()), nbOutputs);
        }
        check(all == (!half || op.halfSupported), label + ": supportsFormatCombination" + (half ? " float16" : ""));
        if (half)
        {
            continue;
        }
        for (auto const& [pos, type] : op.badTypes)
        {
            std::vector<DynamicPluginTensorDesc> bad = inOut;
            bad[pos].desc.type = type;
            check(!build->supportsFormatCombination(pos, bad.data(), static_cast<int32_t>(op.inputs.size()), nbOutputs),
                label + ": rejects type " + std::to_string(static_cast<int>(type)) + " at position "
                    + std::to_string(pos));
        }
        std::vector<DynamicPluginTensorDesc> strided = inOut;
        strided[0].desc.format = TensorFormat::kCHW32;
        check(!build->supportsFormatCombination(0, strided.data(), static_cast<int32_t>(op.inputs.size()), nbOutputs),
            label + ": rejects a non-linear format");
    }

    // configurePlugin: the valid shapes, then each bad set.
    std::vector<DynamicPluginTensorDesc> in = describe(op.inputs, op.inputTypesFloat);
    std::vector<DynamicPluginTensorDesc> out = describe(op.expectedOutputs, op.outputTypesFloat);
    check(build->configurePlugin(in.data(), static_cast<int32_t>(in.size()), out.data(), nbOutputs) == 0,
        label + ": configurePlugin accepts valid shapes");
    for (auto const& [why, shapes] : op.badInputs)
    {
        std::vector<DynamicPluginTensorDesc> bad = describe(shapes, op.inputTypesFloat);
        check(build->configurePlugin(bad.data(), static_cast<int32_t>(bad.size()), out.data(), nbOutputs) != 0,
            label + ": configurePlugin rejects " + why);
    }
    check(build->getWorkspaceSize(in.data(), static_cast<int32_t>(in.size()), out.data(), nbOutputs) < (1U << 30),
        label + ": workspace size is bounded");

    // onShapeChange: the runtime shapes of the valid call pass, each inconsistent set is refused.
    std::vector<PluginTensorDesc> runIn = runtimeDescs(op.inputs, op.inputTypesFloat);
    std::vector<PluginTensorDesc> runOut = runtimeDescs(op.expectedOutputs, op.outputTypesFloat);
    check(runtime->onShapeChange(runIn.data(), static_cast<int32_t>(runIn.size()), runOut.data(), nbOutputs) == 0,
        label + ": onShapeChange accepts valid shapes");
    for (auto const& [why, shapes] : op.badInputs)
    {
        std::vector<PluginTensorDesc> bad = runtimeDescs(shapes, op.inputTypesFloat);
        check(runtime->onShapeChange(bad.data(), static_cast<int32_t>(bad.size()), runOut.data(), nbOutputs) != 0,
            label + ": onShapeChange refuses " + why);
    }
    check(runtime->onShapeChange(runIn.data(), static_cast<int32_t>(runIn.size()) - 1, runOut.data(), nbOutputs) != 0,
        label + ": onShapeChange refuses a missing input");
}

void checkOp(IPluginCreatorV3One* creator, OpCase const& op)
{
    std::string const label = op.name;
    check(std::string("1") == creator->getPluginVersion() && std::string("sparsevlm") == creator->getPluginNamespace(),
        label + ": creator version / namespace");
    PluginFieldCollection const* names = creator->getFieldNames();
    std::vector<std::string> got;
    for (int32_t i = 0; names != nullptr && i < names->nbFields; ++i)
    {
        got.emplace_back(names->fields[i].name);
    }
    check(got == op.fieldNames, label + ": creator field names");

    for (size_t i = 0; i < op.badAttributes.size(); ++i)
    {
        std::unique_ptr<IPluginV3> bad(create(creator, op.badAttributes[i], TensorRTPhase::kBUILD));
        check(bad == nullptr, label + ": createPlugin rejects bad attributes #" + std::to_string(i));
    }

    std::unique_ptr<IPluginV3> plugin(create(creator, op.attributes, TensorRTPhase::kBUILD));
    check(plugin != nullptr, label + ": createPlugin (BUILD)");
    if (!plugin)
    {
        return;
    }
    checkPlugin(plugin.get(), op, label + " (BUILD)");

    // RUNTIME phase from the serialized fields: same fields again, same behaviour.
    auto* runtime = static_cast<IPluginV3OneRuntime*>(plugin->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
    std::string const fields = fieldsText(runtime->getFieldsToSerialize());
    std::unique_ptr<IPluginV3> restored(creator->createPlugin("harness", runtime->getFieldsToSerialize(),
        TensorRTPhase::kRUNTIME));
    check(restored != nullptr, label + ": createPlugin (RUNTIME) from getFieldsToSerialize");
    if (restored)
    {
        auto* restoredRuntime
            = static_cast<IPluginV3OneRuntime*>(restored->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
        check(fieldsText(restoredRuntime->getFieldsToSerialize()) == fields, label + ": serialized fields round trip");
        checkPlugin(restored.get(), op, label + " (RUNTIME)");
    }

    std::unique_ptr<IPluginV3> cloned(plugin->clone());
    check(cloned != nullptr && cloned.get() != plugin.get(), label + ": clone");
    if (cloned)
    {
        auto* clonedRuntime
            = static_cast<IPluginV3OneRuntime*>(cloned->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
        check(fieldsText(clonedRuntime->getFieldsToSerialize()) == fields, label + ": clone keeps the fields");
        checkPlugin(cloned.get(), op, label + " (clone)");
    }
    std::unique_ptr<IPluginV3> attached(runtime->attachToContext(nullptr));
    check(attached != nullptr && attached.get() != plugin.get(), label + ": attachToContext returns a copy");
}

std::vector<OpCase> opCases()
{
    DataType const F = DataType::kFLOAT;
    DataType const M = DataType::kINT32; // masks cross the plugin boundary as int32 0/1
    DataType const I = DataType::kINT64;
    DataType const BOOL = DataType::kBOOL;
    std::vector<OpCase> cases;

    OpCase topk;
    topk.name = "TopKTokenSelect";
    topk.fieldNames = {"k"};
    topk.attributes = {intField("k", 3)};
    topk.badAttributes = {{}, {intField("k", -1)}, {floatField("k", 3.0F)}};
    topk.inputs = {{2, 10, 4}, {2, 10}};
    topk.inputTypesFloat = {F, F};
    topk.outputTypesFloat = {F, I};
    topk.expectedOutputs = {{2, 3, 4}, {2, 3}};
    topk.badInputs = {{"k > N", {{2, 2, 4}, {2, 2}}}, {"scores of another length", {{2, 10, 4}, {2, 9}}},
        {"scores of another batch", {{2, 10, 4}, {3, 10}}}, {"tokens of rank 2", {{2, 10}, {2, 10}}}};
    topk.badTypes = {{1, DataType::kHALF}, {3, DataType::kINT32}, {0, DataType::kINT8}};
    topk.moreShapes = {{{{1, 3, 2}, {1, 3}}, {{1, 3, 2}, {1, 3}}}};
    cases.push_back(topk);

    OpCase prune;
    prune.name = "TokenPrune";
    prune.inputs = {{2, 12, 4}, {2, 12}, {2, 12}, {2}, {2, 3, 4}, {2, 3}, {7}};
    prune.inputTypesFloat = {F, F, M, I, F, M, I};
    prune.outputTypesFloat = {F, M, I};
    prune.expectedOutputs = {{2, 7, 4}, {2, 7}, {2, 7}};
    prune.badInputs = {{"merged with another D", {{2, 12, 4}, {2, 12}, {2, 12}, {2}, {2, 3, 5}, {2, 3}, {7}}},
        {"keep_count of another batch", {{2, 12, 4}, {2, 12}, {2, 12}, {3}, {2, 3, 4}, {2, 3}, {7}}},
        {"scores of another V", {{2, 12, 4}, {2, 11}, {2, 12}, {2}, {2, 3, 4}, {2, 3}, {7}}},
        {"visual_valid of another V", {{2, 12, 4}, {2, 12}, {2, 13}, {2}, {2, 3, 4}, {2, 3}, {7}}},
        {"visual_valid of another batch", {{2, 12, 4}, {2, 12}, {1, 12}, {2}, {2, 3, 4}, {2, 3}, {7}}},
        {"merged_valid of another C", {{2, 12, 4}, {2, 12}, {2, 12}, {2}, {2, 3, 4}, {2, 4}, {7}}},
        {"merged of another batch", {{2, 12, 4}, {2, 12}, {2, 12}, {2}, {1, 3, 4}, {2, 3}, {7}}},
        {"out_width of rank 2", {{2, 12, 4}, {2, 12}, {2, 12}, {2}, {2, 3, 4}, {2, 3}, {7, 1}}},
        {"D = 0", {{2, 12, 0}, {2, 12}, {2, 12}, {2}, {2, 3, 0}, {2, 3}, {7}}}};
    prune.badTypes = {{2, DataType::kINT8}, {3, DataType::kINT32}, {8, DataType::kINT64}, {4, DataType::kHALF},
        {2, BOOL}, {5, BOOL}, {8, BOOL}, {6, BOOL}};
    cases.push_back(prune);

    OpCase recycle;
    recycle.name = "TokenRecycle";
    recycle.fieldNames = {"candidate_percent", "cluster_divisor"};
    recycle.attributes = {intField("candidate_percent", 30), intField("cluster_divisor", 10)};
    recycle.badAttributes = {{intField("candidate_percent", 100)}, {intField("cluster_divisor", 1)},
        {intField("candidate_percent", -5)}};
    recycle.inputs = {{2, 576, 8}, {2, 576}, {2, 576}, {2}};
    recycle.inputTypesFloat = {F, F, M, I};
    recycle.outputTypesFloat = {F, M};
    recycle.expectedOutputs = {{2, 18, 8}, {2, 18}}; // C = 18 for V = 576 (OPS.md)
    recycle.badInputs = {{"scores of another length", {{2, 576, 8}, {2, 575}, {2, 576}, {2}}},
        {"visual_valid of another V", {{2, 576, 8}, {2, 576}, {2, 577}, {2}}},
        {"visual_valid of another batch", {{2, 576, 8}, {2, 576}, {3, 576}, {2}}},
        {"keep_count of another batch", {{2, 576, 8}, {2, 576}, {2, 576}, {1}}},
        {"keep_count of rank 2", {{2, 576, 8}, {2, 576}, {2, 576}, {2, 1}}}};
    recycle.badTypes = {{3, DataType::kINT32}, {2, DataType::kFLOAT}, {5, DataType::kINT8}, {2, BOOL}, {5, BOOL}};
    // C = pool(V) // 10 + 1 with pool(V) = 30 V // 100 + 1 for every V, V = 0 included (C = 1: the
    // kernel writes that slot as zeros with merged_valid 0).
    recycle.moreShapes = {{{{2, 0, 8}, {2, 0}, {2, 0}, {2}}, {{2, 1, 8}, {2, 1}}},
        {{{3, 1, 8}, {3, 1}, {3, 1}, {3}}, {{3, 1, 8}, {3, 1}}},
        {{{1, 33, 8}, {1, 33}, {1, 33}, {1}}, {{1, 2, 8}, {1, 2}}}};
    cases.push_back(recycle);

    OpCase rank;
    rank.name = "RankKeepCount";
    rank.fieldNames = {"rule", "scale", "bias", "lam"};
    rank.attributes = {stringField("rule", "v1.0"), doubleField("scale", 0.7), floatField("bias", 0.1F)};
    rank.badAttributes = {{stringField("rule", "v2"), floatField("scale", 1.0F), floatField("bias", 0.0F)},
        {stringField("rule", "v1.0"), floatField("scale", 1.0F)}, {stringField("rule", "paper")}, {}};
    rank.inputs = {{3, 5, 576}, {3, 5}, {3, 576}};
    rank.inputTypesFloat = {F, M, M};
    rank.outputTypesFloat = {I, I};
    rank.expectedOutputs = {{3}, {3}};
    rank.badInputs = {{"visual_valid of another width", {{3, 5, 576}, {3, 5}, {3, 575}}},
        {"rater_mask of another batch", {{3, 5, 576}, {4, 5}, {3, 576}}},
        {"rater_mask of another T", {{3, 5, 576}, {3, 6}, {3, 576}}}};
    rank.badTypes = {{1, DataType::kINT8}, {3, DataType::kINT32}, {0, DataType::kINT64}, {1, BOOL}, {2, BOOL}};
    cases.push_back(rank);

    OpCase paper = rank;
    paper.attributes = {stringField("rule", "paper"), doubleField("lam", 0.3)};
    cases.push_back(paper);
    return cases;
}

// A field of getFieldsToSerialize as a double, only when it is one kFLOAT64.
bool serializedDouble(PluginFieldCollection const* fc, std::string const& name, double& value)
{
    for (int32_t i = 0; fc != nullptr && i < fc->nbFields; ++i)
    {
        PluginField const& f = fc->fields[i];
        if (name == f.name)
        {
            if (f.type != PluginFieldType::kFLOAT64 || f.length != 1 || f.data == nullptr)
            {
                return false;
            }
            std::memcpy(&value, f.data, sizeof value);
            return true;
        }
    }
    return false;
}

// RankKeepCount holds scale, bias and lam as double (Python floats): a kFLOAT64 attribute is
// kept bit for bit, a kFLOAT32 one widened exactly, both serialized as kFLOAT64 and restored.
void checkRankParamsStayDouble(IPluginCreatorV3One* creator)
{
    float const bias32 = 0.1F;
    std::unique_ptr<IPluginV3> plugin(create(creator,
        {stringField("rule", "v1.0"), doubleField("scale", 0.7), floatField("bias", bias32)}, TensorRTPhase::kBUILD));
    check(plugin != nullptr, "RankKeepCount: created with a kFLOAT64 scale");
    if (!plugin)
    {
        return;
    }
    auto* runtime = static_cast<IPluginV3OneRuntime*>(plugin->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
    double scale = 0.0;
    double bias = 0.0;
    check(serializedDouble(runtime->getFieldsToSerialize(), "scale", scale) && scale == 0.7,
        "RankKeepCount: scale 0.7 serialized as that double (kFLOAT64)");
    check(serializedDouble(runtime->getFieldsToSerialize(), "bias", bias) && bias == static_cast<double>(bias32),
        "RankKeepCount: a kFLOAT32 bias widened exactly and serialized as kFLOAT64");
    std::unique_ptr<IPluginV3> restored(
        creator->createPlugin("harness", runtime->getFieldsToSerialize(), TensorRTPhase::kRUNTIME));
    check(restored != nullptr, "RankKeepCount: restored from its kFLOAT64 fields");
    if (restored)
    {
        auto* restoredRuntime
            = static_cast<IPluginV3OneRuntime*>(restored->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
        double restoredScale = 0.0;
        check(serializedDouble(restoredRuntime->getFieldsToSerialize(), "scale", restoredScale)
                && restoredScale == 0.7,
            "RankKeepCount: scale 0.7 survives the RUNTIME round trip");
    }
    std::unique_ptr<IPluginV3> paper(
        create(creator, {stringField("rule", "paper"), doubleField("lam", 0.3)}, TensorRTPhase::kBUILD));
    double lam = 0.0;
    check(paper != nullptr
            && serializedDouble(static_cast<IPluginV3OneRuntime*>(
                                    paper->getCapabilityInterface(PluginCapabilityType::kRUNTIME))
                                    ->getFieldsToSerialize(),
                "lam", lam)
            && lam == 0.3,
        "RankKeepCount: lam 0.3 serialized as that double (kFLOAT64)");
}

// TopKTokenSelect's profiles: only a profile where the runtime N can be below k for every shape
// (max N < k) or a static N below k fails; min N < k <= max N is accepted, and onShapeChange
// then refuses the calls whose N is below k.
void checkTopKProfiles(IPluginCreatorV3One* creator)
{
    std::unique_ptr<IPluginV3> plugin(create(creator, {intField("k", 5)}, TensorRTPhase::kBUILD));
    check(plugin != nullptr, "TopKTokenSelect: created with k = 5");
    if (!plugin)
    {
        return;
    }
    auto* build = static_cast<IPluginV3OneBuild*>(plugin->getCapabilityInterface(PluginCapabilityType::kBUILD));
    auto* runtime = static_cast<IPluginV3OneRuntime*>(plugin->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
    auto const profile = [](int64_t dimN, int64_t minN, int64_t maxN)
    {
        std::vector<DynamicPluginTensorDesc> in
            = describe({{2, dimN, 4}, {2, dimN}}, {DataType::kFLOAT, DataType::kFLOAT});
        for (DynamicPluginTensorDesc& d : in)
        {
            d.min.d[1] = minN;
            d.opt.d[1] = maxN;
            d.max.d[1] = maxN;
        }
        return in;
    };
    std::vector<DynamicPluginTensorDesc> out = describe({{2, 5, 4}, {2, 5}}, {DataType::kFLOAT, DataType::kINT64});
    std::vector<std::tuple<char const*, int64_t, int64_t, int64_t, bool>> const cases{
        {"dynamic N in [2, 10]", -1, 2, 10, true}, {"dynamic N in [5, 5]", -1, 5, 5, true},
        {"dynamic N in [2, 4]", -1, 2, 4, false}, {"static N = 4", 4, 4, 4, false}, {"static N = 6", 6, 6, 6, true}};
    for (auto const& [what, dimN, minN, maxN, accepted] : cases)
    {
        std::vector<DynamicPluginTensorDesc> in = profile(dimN, minN, maxN);
        bool const ok = build->configurePlugin(in.data(), 2, out.data(), 2) == 0;
        check(ok == accepted,
            std::string("TopKTokenSelect k = 5: configurePlugin ") + (accepted ? "accepts " : "rejects ") + what);
    }
    for (int64_t n : {3, 4, 5, 9})
    {
        std::vector<PluginTensorDesc> in = runtimeDescs({{2, n, 4}, {2, n}}, {DataType::kFLOAT, DataType::kFLOAT});
        std::vector<PluginTensorDesc> outDesc = runtimeDescs({{2, 5, 4}, {2, 5}}, {DataType::kFLOAT, DataType::kINT64});
        bool const ok = runtime->onShapeChange(in.data(), 2, outDesc.data(), 2) == 0;
        check(ok == (n >= 5), "TopKTokenSelect k = 5: onShapeChange " + std::string(n >= 5 ? "accepts" : "refuses")
            + " N = " + std::to_string(n));
    }
}

// --- Shape queries (--output-shapes) ----------------------------------------------------------

Shape parseShape(std::string const& text)
{
    Shape shape;
    if (text == "-")
    {
        return shape;
    }
    size_t start = 0;
    while (start <= text.size())
    {
        size_t const end = text.find('x', start);
        shape.push_back(std::stoll(text.substr(start, end == std::string::npos ? std::string::npos : end - start)));
        if (end == std::string::npos)
        {
            break;
        }
        start = end + 1;
    }
    return shape;
}

std::string shapesText(std::vector<Shape> const& shapes)
{
    std::string text;
    for (Shape const& s : shapes)
    {
        std::string one;
        for (size_t i = 0; i < s.size(); ++i)
        {
            one += (i ? "x" : "") + std::to_string(s[i]);
        }
        text += (text.empty() ? "" : " ") + (one.empty() ? std::string("-") : one);
    }
    return text;
}

// One request line -> one answer line (see the file comment).
std::string answerShapeQuery(std::map<std::string, IPluginCreatorV3One*> const& creators, std::string const& line)
{
    std::vector<std::string> words;
    for (size_t start = 0; start < line.size();)
    {
        size_t const end = line.find(' ', start);
        std::string const word = line.substr(start, end == std::string::npos ? std::string::npos : end - start);
        if (!word.empty())
        {
            words.push_back(word);
        }
        start = end == std::string::npos ? line.size() : end + 1;
    }
    auto const found = words.empty() ? creators.end() : creators.find(words[0]);
    if (found == creators.end())
    {
        return "error: unknown op";
    }
    std::vector<Attribute> attributes;
    std::vector<Shape> inputs;
    bool afterColon = false;
    for (size_t i = 1; i < words.size(); ++i)
    {
        if (words[i] == ":")
        {
            afterColon = true;
        }
        else if (afterColon)
        {
            inputs.push_back(parseShape(words[i]));
        }
        else
        {
            size_t const equals = words[i].find('=');
            static std::deque<std::string> names; // PluginField keeps the name pointer
            names.push_back(words[i].substr(0, equals));
            int32_t const value = static_cast<int32_t>(std::stol(words[i].substr(equals + 1)));
            attributes.push_back(intField(names.back().c_str(), value));
        }
    }
    std::unique_ptr<IPluginV3> plugin(create(found->second, attributes, TensorRTPhase::kBUILD));
    if (!plugin)
    {
        return "error: createPlugin refused the attributes";
    }
    auto* build = static_cast<IPluginV3OneBuild*>(plugin->getCapabilityInterface(PluginCapabilityType::kBUILD));
    std::string answer;
    for (bool symbolic : {false, true})
    {
        int32_t status = -1;
        std::vector<Shape> const got = outputShapes(build, inputs, symbolic, status);
        answer += (symbolic ? " | " : "") + (status == 0 ? shapesText(got) : std::string("error"));
    }
    return answer;
}

} // namespace

int main(int argc, char** argv)
{
    bool const shapeQueries = argc == 3 && std::string(argv[2]) == "--output-shapes";
    if (argc != 2 && !shapeQueries)
    {
        std::fprintf(stderr, "usage: %s path/to/libsparsevlm_plugins.so [--output-shapes < requests]\n", argv[0]);
        return 2;
    }
    void* library = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
    if (library == nullptr)
    {
        std::fprintf(stderr, "harness: cannot load %s: %s\n", argv[1], dlerror());
        return 2;
    }
    using GetCreators = IPluginCreatorInterface* const* (*) (int32_t&);
    using SetLoggerFinder = void (*)(ILoggerFinder*);
    auto getCreators = reinterpret_cast<GetCreators>(dlsym(library, "getCreators"));
    auto setLoggerFinder = reinterpret_cast<SetLoggerFinder>(dlsym(library, "setLoggerFinder"));
    check(getCreators != nullptr && setLoggerFinder != nullptr, "library exports getCreators and setLoggerFinder");
    if (getCreators == nullptr || setLoggerFinder == nullptr)
    {
        std::printf("harness: %d checks, %d failed\n", gChecks, gFailures);
        return 1;
    }
    setLoggerFinder(nullptr); // no runtime: the plugins fall back to stderr

    int32_t count = 0;
    IPluginCreatorInterface* const* creators = getCreators(count);
    check(count == 4, "getCreators returns 4 creators");
    std::map<std::string, IPluginCreatorV3One*> byName;
    for (int32_t i = 0; i < count; ++i)
    {
        InterfaceInfo const info = creators[i]->getInterfaceInfo();
        check(std::string(info.kind) == "PLUGIN CREATOR_V3ONE" && info.major == 1,
            std::string("creator ") + std::to_string(i) + " is an IPluginCreatorV3One (1.x)");
        auto* creator = static_cast<IPluginCreatorV3One*>(creators[i]);
        byName[creator->getPluginName()] = creator;
    }
    if (shapeQueries)
    {
        std::string line;
        while (std::getline(std::cin, line))
        {
            std::printf("%s\n", answerShapeQuery(byName, line).c_str());
        }
        return 0;
    }
    for (OpCase const& op : opCases())
    {
        auto const found = byName.find(op.name);
        check(found != byName.end(), op.name + ": creator present");
        if (found != byName.end())
        {
            checkOp(found->second, op);
        }
    }
    if (byName.count("TopKTokenSelect") != 0)
    {
        checkTopKProfiles(byName["TopKTokenSelect"]);
    }
    if (byName.count("RankKeepCount") != 0)
    {
        checkRankParamsStayDouble(byName["RankKeepCount"]);
    }
    return sparsevlm_tests::report("harness");
}
