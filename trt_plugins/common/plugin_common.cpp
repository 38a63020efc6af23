// Shared plugin plumbing declared in plugin_common.h.
#include "plugin_common.h"

#include <atomic>
#include <cstdio>
#include <cstring>

using namespace nvinfer1;

namespace sparsevlm
{

namespace
{
std::atomic<ILoggerFinder*> gLoggerFinder{nullptr};
} // namespace

void setLoggerFinder(ILoggerFinder* finder) noexcept
{
    gLoggerFinder.store(finder);
}

void logError(std::string const& message) noexcept
{
    std::string const text = std::string("[sparsevlm plugins] ") + message;
    ILoggerFinder* finder = gLoggerFinder.load();
    ILogger* logger = finder != nullptr ? finder->findLogger() : nullptr;
    if (logger != nullptr)
    {
        logger->log(ILogger::Severity::kERROR, text.c_str());
    }
    else
    {
        std::fprintf(stderr, "%s\n", text.c_str());
    }
}

IPluginCreatorInterface* const* allCreators(int32_t& count) noexcept
{
    static IPluginCreatorInterface* const creators[]
        = {topKTokenSelectCreator(), tokenPruneCreator(), tokenRecycleCreator(), rankKeepCountCreator()};
    count = static_cast<int32_t>(sizeof(creators) / sizeof(creators[0]));
    return creators;
}

bool readInt(PluginField const& field, int64_t& value)
{
    if (field.data != nullptr && field.length == 1)
    {
        switch (field.type)
        {
        case PluginFieldType::kINT8: value = *static_cast<int8_t const*>(field.data); return true;
        case PluginFieldType::kINT16: value = *static_cast<int16_t const*>(field.data); return true;
        case PluginFieldType::kINT32: value = *static_cast<int32_t const*>(field.data); return true;
        case PluginFieldType::kINT64: value = *static_cast<int64_t const*>(field.data); return true;
        default: break;
        }
    }
    logError(std::string("field '") + field.name + "' must be one integer (kINT32 or kINT64)");
    return false;
}

bool readDouble(PluginField const& field, double& value)
{
    if (field.data != nullptr && field.length == 1)
    {
        if (field.type == PluginFieldType::kFLOAT32)
        {
            value = *static_cast<float const*>(field.data);
            return true;
        }
        if (field.type == PluginFieldType::kFLOAT64)
        {
            value = *static_cast<double const*>(field.data);
            return true;
        }
    }
    logError(std::string("field '") + field.name + "' must be one float (kFLOAT32 or kFLOAT64)");
    return false;
}

bool readString(PluginField const& field, std::string& value)
{
    if (field.data == nullptr || field.type != PluginFieldType::kCHAR || field.length < 0)
    {
        logError(std::string("field '") + field.name + "' must be a string (kCHAR)");
        return false;
    }
    // The parser may or may not count a terminating NUL in the length: drop any.
    value.assign(static_cast<char const*>(field.data), static_cast<size_t>(field.length));
    value.erase(value.find_last_not_of('\0') + 1);
    return true;
}

ElementType elementType(DataType type)
{
    return type == DataType::kHALF ? ElementType::kFLOAT16 : ElementType::kFLOAT32;
}

IPluginCapability* PluginBase::getCapabilityInterface(PluginCapabilityType type) noexcept
{
    switch (type)
    {
    case PluginCapabilityType::kCORE: return static_cast<IPluginV3OneCore*>(this);
    case PluginCapabilityType::kBUILD: return static_cast<IPluginV3OneBuild*>(this);
    case PluginCapabilityType::kRUNTIME: return static_cast<IPluginV3OneRuntime*>(this);
    }
    return nullptr;
}

PluginFieldCollection const* PluginBase::serializedFields(std::vector<PluginField> fields) noexcept
{
    mSerializedFields = std::move(fields);
    mSerializedCollection.nbFields = static_cast<int32_t>(mSerializedFields.size());
    mSerializedCollection.fields = mSerializedFields.data();
    return &mSerializedCollection;
}

bool PluginBase::checkRanks(char const* op, Dims const* dims, int32_t count, std::vector<int32_t> const& ranks,
    std::vector<char const*> const& names)
{
    for (int32_t i = 0; i < count; ++i)
    {
        if (dims[i].nbDims != ranks[i])
        {
            logError(std::string(op) + ": '" + names[i] + "' must have " + std::to_string(ranks[i])
                + " dimensions, got " + std::to_string(dims[i].nbDims));
            return false;
        }
    }
    return true;
}

bool PluginBase::configuredShapesValid(
    DynamicPluginTensorDesc const* in, int32_t nbInputs, int32_t nbOutputs) const noexcept
{
    if (in == nullptr || nbInputs < 0 || nbInputs > kMaxInputs || nbOutputs != getNbOutputs())
    {
        logError(std::string(getPluginName()) + ": configurePlugin got " + std::to_string(nbInputs) + " inputs and "
            + std::to_string(nbOutputs) + " outputs");
        return false;
    }
    Dims dims[kMaxInputs];
    for (int32_t i = 0; i < nbInputs; ++i)
    {
        dims[i] = in[i].desc.dims;
    }
    return checkShapes(dims, nbInputs);
}

int32_t PluginBase::onShapeChange(PluginTensorDesc const* in, int32_t nbInputs, PluginTensorDesc const*,
    int32_t nbOutputs) noexcept
{
    if (in == nullptr || nbInputs < 0 || nbInputs > kMaxInputs || nbOutputs != getNbOutputs())
    {
        logError(std::string(getPluginName()) + ": onShapeChange got " + std::to_string(nbInputs) + " inputs and "
            + std::to_string(nbOutputs) + " outputs");
        return -1;
    }
    Dims dims[kMaxInputs];
    for (int32_t i = 0; i < nbInputs; ++i)
    {
        dims[i] = in[i].dims;
    }
    return checkShapes(dims, nbInputs) ? 0 : -1;
}

CreatorBase::CreatorBase(std::vector<PluginField> fieldNames)
    : mFieldNames(std::move(fieldNames))
{
    mFieldCollection.nbFields = static_cast<int32_t>(mFieldNames.size());
    mFieldCollection.fields = mFieldNames.data();
}

} // namespace sparsevlm
