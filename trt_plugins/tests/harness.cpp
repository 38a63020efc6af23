// CPU harness for libsparsevlm_plugins.so: dlopens the library (no libnvinfer, no GPU),
// calls getCreators and drives every IPluginV3 interface except enqueue:
//   creators (name, version, namespace, field names), createPlugin in both phases (and
//   rejection of bad attributes), capabilities, output types, output shapes through a fake
//   IExprBuilder, supportsFormatCombination, configurePlugin (accepting good and rejecting
//   bad shapes), workspace size, getFieldsToSerialize -> RUNTIME createPlugin round trip,
//   clone and attachToContext.
// Usage: sparsevlm_plugin_harness path/to/libsparsevlm_plugins.so
// Prints one line per failed check and a summary "harness: N checks, F failed"; exit 0 iff F == 0.
#include <NvInfer.h>

#include <dlfcn.h>

#include <cstdio>
#include <cstring>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <string>
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
    std::vector<std::pair<std::string, std::vector<Shape>>> badInputs; // configurePlugin must reject
    std::vector<std::pair<int32_t, DataType>> badTypes;                 // (position, type) unsupported
    bool halfSupported = true;                                          // T = float16 accepted
};

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
    for (bool symbolic : {false, true})
    {
        int32_t status = -1;
        std::vector<Shape> got = outputShapes(build, op.inputs, symbolic, status);
        std::string text;
        for (Shape const& s : got)
        {
            text += shapeText(s);
        }
        check(status == 0 && got == op.expectedOutputs,
            label + ": output shapes " + (symbolic ? "(dynamic dims) " : "") + "got " + text);
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
    check(runtime->onShapeChange(nullptr, 0, nullptr, 0) == 0, label + ": onShapeChange");
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
    DataType const B = DataType::kBOOL;
    DataType const I = DataType::kINT64;
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
        {"tokens of rank 2", {{2, 10}, {2, 10}}}};
    topk.badTypes = {{1, DataType::kHALF}, {3, DataType::kINT32}, {0, DataType::kINT8}};
    cases.push_back(topk);

    OpCase prune;
    prune.name = "TokenPrune";
    prune.inputs = {{2, 12, 4}, {2, 12}, {2, 12}, {2}, {2, 3, 4}, {2, 3}, {7}};
    prune.inputTypesFloat = {F, F, B, I, F, B, I};
    prune.outputTypesFloat = {F, B, I};
    prune.expectedOutputs = {{2, 7, 4}, {2, 7}, {2, 7}};
    prune.badInputs = {{"merged with another D", {{2, 12, 4}, {2, 12}, {2, 12}, {2}, {2, 3, 5}, {2, 3}, {7}}},
        {"keep_count of another batch", {{2, 12, 4}, {2, 12}, {2, 12}, {3}, {2, 3, 4}, {2, 3}, {7}}},
        {"out_width of rank 2", {{2, 12, 4}, {2, 12}, {2, 12}, {2}, {2, 3, 4}, {2, 3}, {7, 1}}},
        {"D = 0", {{2, 12, 0}, {2, 12}, {2, 12}, {2}, {2, 3, 0}, {2, 3}, {7}}}};
    prune.badTypes = {{2, DataType::kINT8}, {3, DataType::kINT32}, {8, DataType::kINT64}, {4, DataType::kHALF}};
    cases.push_back(prune);

    OpCase recycle;
    recycle.name = "TokenRecycle";
    recycle.fieldNames = {"candidate_percent", "cluster_divisor"};
    recycle.attributes = {intField("candidate_percent", 30), intField("cluster_divisor", 10)};
    recycle.badAttributes = {{intField("candidate_percent", 100)}, {intField("cluster_divisor", 1)},
        {intField("candidate_percent", -5)}};
    recycle.inputs = {{2, 576, 8}, {2, 576}, {2, 576}, {2}};
    recycle.inputTypesFloat = {F, F, B, I};
    recycle.outputTypesFloat = {F, B};
    recycle.expectedOutputs = {{2, 18, 8}, {2, 18}}; // C = 18 for V = 576 (OPS.md)
    recycle.badInputs = {{"scores of another length", {{2, 576, 8}, {2, 575}, {2, 576}, {2}}},
        {"keep_count of rank 2", {{2, 576, 8}, {2, 576}, {2, 576}, {2, 1}}}};
    recycle.badTypes = {{3, DataType::kINT32}, {2, DataType::kFLOAT}, {5, DataType::kINT8}};
    cases.push_back(recycle);

    OpCase rank;
    rank.name = "RankKeepCount";
    rank.fieldNames = {"rule", "scale", "bias", "lam"};
    rank.attributes = {stringField("rule", "v1.0"), floatField("scale", 13.5F), floatField("bias", 0.0F)};
    rank.badAttributes = {{stringField("rule", "v2"), floatField("scale", 1.0F), floatField("bias", 0.0F)},
        {stringField("rule", "v1.0"), floatField("scale", 1.0F)}, {stringField("rule", "paper")}, {}};
    rank.inputs = {{3, 5, 576}, {3, 5}, {3, 576}};
    rank.inputTypesFloat = {F, B, B};
    rank.outputTypesFloat = {I, I};
    rank.expectedOutputs = {{3}, {3}};
    rank.badInputs = {{"visual_valid of another width", {{3, 5, 576}, {3, 5}, {3, 575}}},
        {"rater_mask of another batch", {{3, 5, 576}, {4, 5}, {3, 576}}}};
    rank.badTypes = {{1, DataType::kINT8}, {3, DataType::kINT32}, {0, DataType::kINT64}};
    cases.push_back(rank);

    OpCase paper = rank;
    paper.attributes = {stringField("rule", "paper"), floatField("lam", 0.5F)};
    cases.push_back(paper);
    return cases;
}

} // namespace

int main(int argc, char** argv)
{
    if (argc != 2)
    {
        std::fprintf(stderr, "usage: %s path/to/libsparsevlm_plugins.so\n", argv[0]);
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
    for (OpCase const& op : opCases())
    {
        auto const found = byName.find(op.name);
        check(found != byName.end(), op.name + ": creator present");
        if (found != byName.end())
        {
            checkOp(found->second, op);
        }
    }
    return sparsevlm_tests::report("harness");
}
