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
        // Calling IPluginRegistry goes through its vtable, whose layout changes between major
        // versions (11.x removed the IPluginCreator overloads): registering into another major
        // version's registry crashes. Measured: 10.14 headers with the 11.4 lean runtime.
        int32_t const runtimeMajor = getInferLibVersion() / 10000;
        if (runtimeMajor != NV_TENSORRT_MAJOR)
        {
            sparsevlm::logError("not registering: built against TensorRT " + std::to_string(NV_TENSORRT_MAJOR)
                + ".x headers but loaded into a TensorRT " + std::to_string(runtimeMajor)
                + ".x runtime; rebuild with matching headers (or use libsparsevlm_plugins.so with loadLibrary)");
            return;
        }
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
