// What the four plugin classes share: namespace and version, logging through TensorRT's
// logger, attribute parsing, and a base class that answers the IPluginV3 boilerplate.
// This is the first header that needs TensorRT (NvInfer.h); the kernels never include it.
#pragma once

#include "host_device.h"

#include <NvInfer.h>

#include <string>
#include <vector>

namespace sparsevlm
{

constexpr char const* kPluginNamespace = "sparsevlm";
constexpr char const* kPluginVersion = "1";

// Errors go to the logger that TensorRT hands over through setLoggerFinder; without a
// runtime (the CPU tests) findLogger() returns null and they go to stderr instead.
void setLoggerFinder(nvinfer1::ILoggerFinder* finder) noexcept;
void logError(std::string const& message) noexcept;

// The creators of the four plugins, one static instance each (defined next to each plugin).
nvinfer1::IPluginCreatorV3One* topKTokenSelectCreator() noexcept;
nvinfer1::IPluginCreatorV3One* tokenPruneCreator() noexcept;
nvinfer1::IPluginCreatorV3One* tokenRecycleCreator() noexcept;
nvinfer1::IPluginCreatorV3One* rankKeepCountCreator() noexcept;

// All four, as getCreators and the static registrar publish them.
nvinfer1::IPluginCreatorInterface* const* allCreators(int32_t& count) noexcept;

// Attribute values. The ONNX parser passes INT attributes as kINT32, FLOAT as kFLOAT32 and
// STRING as kCHAR; the readers also take the wider types (a float is read into a double, as
// Python holds it: kFLOAT64 keeps every bit, kFLOAT32 is widened exactly). False (and an error logged) when
// the field has a type or length they cannot read.
bool readInt(nvinfer1::PluginField const& field, int64_t& value);
bool readDouble(nvinfer1::PluginField const& field, double& value);
bool readString(nvinfer1::PluginField const& field, std::string& value);

// Maps TensorRT's element type to the kernels' own enum (only float32 and float16 reach here).
ElementType elementType(nvinfer1::DataType type);

// A dimension that is known (not -1) and differs from `expected` (also known).
inline bool knownMismatch(int64_t actual, int64_t expected)
{
    return actual >= 0 && expected >= 0 && actual != expected;
}

// The boilerplate of an IPluginV3 that has every capability: core, build and runtime.
class PluginBase : public nvinfer1::IPluginV3,
                   public nvinfer1::IPluginV3OneCore,
                   public nvinfer1::IPluginV3OneBuild,
                   public nvinfer1::IPluginV3OneRuntime
{
public:
    nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override;
    char const* getPluginVersion() const noexcept override
    {
        return kPluginVersion;
    }
    char const* getPluginNamespace() const noexcept override
    {
        return kPluginNamespace;
    }
    // Run time: the shapes of this call go through the same checks as configurePlugin's, now
    // with every dimension known; an inconsistent call is refused before enqueue.
    int32_t onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs, nvinfer1::PluginTensorDesc const* out,
        int32_t nbOutputs) noexcept override;
    nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext*) noexcept override
    {
        return clone(); // no per-context resources
    }

protected:
    // Fills the collection getFieldsToSerialize returns; the fields point into the plugin.
    nvinfer1::PluginFieldCollection const* serializedFields(std::vector<nvinfer1::PluginField> fields) noexcept;

    // The plugin's shape rules on its input shapes: ranks, one B, matching widths, and what its
    // kernels need. Called by configurePlugin with the build-time dims (-1 marks a dynamic
    // dimension, which passes: knownMismatch) and by onShapeChange with the runtime ones.
    // Logs the first broken rule and returns false.
    virtual bool checkShapes(nvinfer1::Dims const* inputs, int32_t nbInputs) const noexcept = 0;

    // configurePlugin's shared part: the counts, then checkShapes on the descriptors' dims.
    bool configuredShapesValid(
        nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs, int32_t nbOutputs) const noexcept;

    // True when dims[i] has ranks[i] dimensions for every i in [0, count); logs the first that does not.
    static bool checkRanks(char const* op, nvinfer1::Dims const* dims, int32_t count,
        std::vector<int32_t> const& ranks, std::vector<char const*> const& names);

    // The most inputs any of the plugins has (TokenPrune's 7).
    static constexpr int32_t kMaxInputs = 7;

private:
    std::vector<nvinfer1::PluginField> mSerializedFields;
    nvinfer1::PluginFieldCollection mSerializedCollection{};
};

// The boilerplate of an IPluginCreatorV3One in the sparsevlm namespace.
class CreatorBase : public nvinfer1::IPluginCreatorV3One
{
public:
    explicit CreatorBase(std::vector<nvinfer1::PluginField> fieldNames);
    nvinfer1::PluginFieldCollection const* getFieldNames() noexcept override
    {
        return &mFieldCollection;
    }
    char const* getPluginVersion() const noexcept override
    {
        return kPluginVersion;
    }
    char const* getPluginNamespace() const noexcept override
    {
        return kPluginNamespace;
    }

private:
    std::vector<nvinfer1::PluginField> mFieldNames;
    nvinfer1::PluginFieldCollection mFieldCollection{};
};

} // namespace sparsevlm
