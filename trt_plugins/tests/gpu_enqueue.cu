// Drives every plugin of libsparsevlm_plugins.so the way TensorRT does at run time, enqueue
// included, with device buffers, at the LLaVA-1.5-7B shapes of llava_cases.h, and compares the
// outputs with the CPU path. Needs no TensorRT library: like harness.cpp it dlopens the plugin
// library (which links no libnvinfer) and calls its getCreators; the IPluginV3 interfaces are
// abstract classes from the headers. Per case:
//   createPlugin(BUILD) -> configurePlugin (the case's shapes as the profile) -> getWorkspaceSize
//   (must equal the kernels' own workspaceSize) -> getFieldsToSerialize -> createPlugin(RUNTIME)
//   -> attachToContext -> onShapeChange -> enqueue (first call checked against the CPU path, then
//   timed with CUDA events, then checked again).
// Build: nvcc -std=c++17 -O2 -arch=sm_90 -I<TensorRT include> gpu_enqueue.cu -o gpu_enqueue -ldl
// Usage: gpu_enqueue path/to/libsparsevlm_plugins.so [--dry-run] [--warmup N] [--runs N]
//   --dry-run: no device; everything up to onShapeChange (not the CPU path), and the table
//              with "n/a (dry run)" times.
// Prints one line per failed check and "gpu_enqueue: N checks, F failed"; exits 0 iff F == 0,
// 77 when no CUDA device is present (except in --dry-run), 2 on bad usage or an unloadable library.
#include <NvInfer.h>

#include <dlfcn.h>

#include <cstdlib>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "check.h"
#include "llava_cases.h"

using namespace nvinfer1;
using namespace sparsevlm_tests;

namespace
{

DataType dataTypeOf(Kind kind)
{
    switch (kind)
    {
    case Kind::kF32: return DataType::kFLOAT;
    case Kind::kF16: return DataType::kHALF;
    case Kind::kI32: return DataType::kINT32;
    case Kind::kI64: return DataType::kINT64;
    }
    return DataType::kFLOAT;
}

Dims dimsOf(std::vector<int64_t> const& shape)
{
    Dims d{};
    d.nbDims = static_cast<int32_t>(shape.size());
    for (size_t i = 0; i < shape.size(); ++i)
    {
        d.d[i] = shape[i];
    }
    return d;
}

// Build-time descriptors: a profile that holds exactly the case's shapes.
std::vector<DynamicPluginTensorDesc> profileDescs(std::vector<Tensor> const& tensors)
{
    std::vector<DynamicPluginTensorDesc> desc(tensors.size());
    for (size_t i = 0; i < tensors.size(); ++i)
    {
        desc[i].desc.dims = dimsOf(tensors[i].shape);
        desc[i].desc.type = dataTypeOf(tensors[i].kind);
        desc[i].desc.format = TensorFormat::kLINEAR;
        desc[i].desc.scale = 1.0F;
        desc[i].min = desc[i].opt = desc[i].max = desc[i].desc.dims;
    }
    return desc;
}

// Run-time descriptors (onShapeChange, enqueue).
std::vector<PluginTensorDesc> runtimeDescs(std::vector<Tensor> const& tensors)
{
    std::vector<PluginTensorDesc> desc(tensors.size());
    for (size_t i = 0; i < tensors.size(); ++i)
    {
        desc[i].dims = dimsOf(tensors[i].shape);
        desc[i].type = dataTypeOf(tensors[i].kind);
        desc[i].format = TensorFormat::kLINEAR;
        desc[i].scale = 1.0F;
    }
    return desc;
}

// The attributes an exported graph gives each op at these shapes.
struct Attributes
{
    int32_t k = static_cast<int32_t>(kTopK);
    int32_t candidatePercent = 30;
    int32_t clusterDivisor = 10;
    std::string rule = "v1.0";
    double scale = 0.0;
    double bias = 0.0;

    std::vector<PluginField> fields(Case const& c)
    {
        scale = c.rankParams.scale;
        bias = c.rankParams.bias;
        switch (c.op)
        {
        case Op::kTopK: return {PluginField("k", &k, PluginFieldType::kINT32, 1)};
        case Op::kPrune: return {};
        case Op::kRecycle:
            return {PluginField("candidate_percent", &candidatePercent, PluginFieldType::kINT32, 1),
                PluginField("cluster_divisor", &clusterDivisor, PluginFieldType::kINT32, 1)};
        case Op::kRank:
            return {PluginField("rule", rule.data(), PluginFieldType::kCHAR, static_cast<int32_t>(rule.size())),
                PluginField("scale", &scale, PluginFieldType::kFLOAT64, 1),
                PluginField("bias", &bias, PluginFieldType::kFLOAT64, 1)};
        }
        return {};
    }
};

template <typename Interface>
Interface* capability(IPluginV3* plugin, PluginCapabilityType type)
{
    return plugin == nullptr ? nullptr : static_cast<Interface*>(plugin->getCapabilityInterface(type));
}

// One case through the plugin; returns the runtime plugin ready to enqueue, or null (a check
// has failed and says why).
std::unique_ptr<IPluginV3> preparePlugin(IPluginCreatorV3One* creator, Case const& c, std::string const& label)
{
    Attributes attributes;
    std::vector<PluginField> fields = attributes.fields(c);
    PluginFieldCollection collection{static_cast<int32_t>(fields.size()), fields.data()};
    std::unique_ptr<IPluginV3> buildPlugin(creator->createPlugin("gpu_enqueue", &collection, TensorRTPhase::kBUILD));
    auto* build = capability<IPluginV3OneBuild>(buildPlugin.get(), PluginCapabilityType::kBUILD);
    auto* buildRuntime = capability<IPluginV3OneRuntime>(buildPlugin.get(), PluginCapabilityType::kRUNTIME);
    check(build != nullptr && buildRuntime != nullptr, label + ": createPlugin (BUILD)");
    if (build == nullptr || buildRuntime == nullptr)
    {
        return nullptr;
    }
    std::vector<DynamicPluginTensorDesc> const in = profileDescs(c.inputs);
    std::vector<DynamicPluginTensorDesc> const out = profileDescs(c.outputs);
    int32_t const nbIn = static_cast<int32_t>(in.size());
    int32_t const nbOut = static_cast<int32_t>(out.size());
    check(build->configurePlugin(in.data(), nbIn, out.data(), nbOut) == 0, label + ": configurePlugin accepts the shapes");
    size_t const workspace = build->getWorkspaceSize(in.data(), nbIn, out.data(), nbOut);
    check(workspace == static_cast<size_t>(c.workspaceBytes),
        label + ": getWorkspaceSize " + std::to_string(workspace) + " bytes, the kernels need "
            + std::to_string(c.workspaceBytes));

    std::unique_ptr<IPluginV3> deserialized(
        creator->createPlugin("gpu_enqueue", buildRuntime->getFieldsToSerialize(), TensorRTPhase::kRUNTIME));
    auto* deserializedRuntime = capability<IPluginV3OneRuntime>(deserialized.get(), PluginCapabilityType::kRUNTIME);
    check(deserializedRuntime != nullptr, label + ": createPlugin (RUNTIME) from the serialized fields");
    if (deserializedRuntime == nullptr)
    {
        return nullptr;
    }
    std::unique_ptr<IPluginV3> attached(deserializedRuntime->attachToContext(nullptr));
    auto* runtime = capability<IPluginV3OneRuntime>(attached.get(), PluginCapabilityType::kRUNTIME);
    check(runtime != nullptr, label + ": attachToContext");
    if (runtime == nullptr)
    {
        return nullptr;
    }
    std::vector<PluginTensorDesc> const inDesc = runtimeDescs(c.inputs);
    std::vector<PluginTensorDesc> const outDesc = runtimeDescs(c.outputs);
    bool const accepted = runtime->onShapeChange(inDesc.data(), nbIn, outDesc.data(), nbOut) == 0;
    check(accepted, label + ": onShapeChange accepts the shapes");
    return accepted ? std::move(attached) : nullptr;
}

} // namespace

int main(int argc, char** argv)
{
    char const* libraryPath = nullptr;
    bool dryRun = false;
    int warmup = 3;
    int runs = 20;
    for (int i = 1; i < argc; ++i)
    {
        std::string const arg = argv[i];
        if (arg == "--dry-run")
        {
            dryRun = true;
        }
        else if ((arg == "--warmup" || arg == "--runs") && i + 1 < argc && std::atoi(argv[i + 1]) > 0)
        {
            (arg == "--warmup" ? warmup : runs) = std::atoi(argv[++i]);
        }
        else if (libraryPath == nullptr && arg.rfind("--", 0) != 0)
        {
            libraryPath = argv[i];
        }
        else
        {
            libraryPath = nullptr;
            break;
        }
    }
    if (libraryPath == nullptr)
    {
        std::fprintf(stderr, "usage: %s path/to/libsparsevlm_plugins.so [--dry-run] [--warmup N] [--runs N]\n", argv[0]);
        return 2;
    }
    int devices = 0;
    if (!dryRun && (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0))
    {
        std::printf("gpu_enqueue: no CUDA device\n");
        return 77;
    }
    void* library = dlopen(libraryPath, RTLD_NOW | RTLD_LOCAL);
    if (library == nullptr)
    {
        std::fprintf(stderr, "gpu_enqueue: cannot load %s: %s\n", libraryPath, dlerror());
        return 2;
    }
    using GetCreators = IPluginCreatorInterface* const* (*) (int32_t&);
    using SetLoggerFinder = void (*)(ILoggerFinder*);
    auto getCreators = reinterpret_cast<GetCreators>(dlsym(library, "getCreators"));
    auto setLoggerFinder = reinterpret_cast<SetLoggerFinder>(dlsym(library, "setLoggerFinder"));
    if (getCreators == nullptr || setLoggerFinder == nullptr)
    {
        std::fprintf(stderr, "gpu_enqueue: %s does not export getCreators and setLoggerFinder\n", libraryPath);
        return 2;
    }
    setLoggerFinder(nullptr); // no TensorRT runtime: the plugins log to stderr
    int32_t count = 0;
    IPluginCreatorInterface* const* creators = getCreators(count);
    std::map<std::string, IPluginCreatorV3One*> byName;
    for (int32_t i = 0; i < count; ++i)
    {
        auto* creator = static_cast<IPluginCreatorV3One*>(creators[i]);
        byName[creator->getPluginName()] = creator;
    }

    // The dry run stops before enqueue: it needs no CPU-path outputs (gpu_check --llava --dry-run
    // runs and checks that path at the same shapes).
    printTableHeader("gpu_enqueue", "IPluginV3OneRuntime::enqueue",
        dryRun ? " (dry run: createPlugin to onShapeChange, no enqueue)" : "", warmup, runs);
    forEachCase(!dryRun,
        [&](Case const& c)
        {
            std::string const label = "enqueue " + rowLabel(c);
            Timing timing;
            auto const found = byName.find(c.opName);
            check(found != byName.end(), label + ": creator in getCreators");
            std::unique_ptr<IPluginV3> plugin
                = found == byName.end() ? nullptr : preparePlugin(found->second, c, label);
            if (plugin && !dryRun)
            {
                auto* runtime = capability<IPluginV3OneRuntime>(plugin.get(), PluginCapabilityType::kRUNTIME);
                std::vector<PluginTensorDesc> const inDesc = runtimeDescs(c.inputs);
                std::vector<PluginTensorDesc> const outDesc = runtimeDescs(c.outputs);
                timing = runAndTime(c, label, warmup, runs,
                    [&](DeviceTensors& d, cudaStream_t stream)
                    {
                        int32_t const status = runtime->enqueue(
                            inDesc.data(), outDesc.data(), d.inputs.data(), d.outputs.data(), d.workspace, stream);
                        return status == 0 ? cudaSuccess : cudaErrorLaunchFailure;
                    });
            }
            printRow("enqueue", c, timing, dryRun);
        });
    return report("gpu_enqueue");
}
