// Registration at load time, for Triton's `plugins=` option and LD_PRELOAD: a static object
// registers the four creators with the process's plugin registry under namespace "sparsevlm".
// REGISTER_TENSORRT_PLUGIN cannot be used: it always registers under namespace "".
// This variant exports no getCreators, so do not pass it to loadLibrary as well.
#include "plugin_common.h"

namespace
{

struct StaticRegistrar
{
    StaticRegistrar()
    {
        int32_t count = 0;
        nvinfer1::IPluginCreatorInterface* const* creators = sparsevlm::allCreators(count);
        nvinfer1::IPluginRegistry* registry = getPluginRegistry();
        for (int32_t i = 0; i < count && registry != nullptr; ++i)
        {
            if (!registry->registerCreator(*creators[i], sparsevlm::kPluginNamespace))
            {
                sparsevlm::logError("could not register a creator with the plugin registry");
            }
        }
    }
};

StaticRegistrar const gRegistrar;

} // namespace
