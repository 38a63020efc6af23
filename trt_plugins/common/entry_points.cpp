// The two symbols IPluginRegistry::loadLibrary (and trtexec --dynamicPlugins, the lean
// runtime, version-compatible plans) look up. Only these are exported: the library is built
// with hidden visibility and TENSORRT_BUILD_LIB, which makes TENSORRTAPI mean "default".
#include "plugin_common.h"

extern "C" TENSORRTAPI nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators)
{
    return sparsevlm::allCreators(nbCreators);
}

extern "C" TENSORRTAPI void setLoggerFinder(nvinfer1::ILoggerFinder* finder)
{
    sparsevlm::setLoggerFinder(finder);
}
