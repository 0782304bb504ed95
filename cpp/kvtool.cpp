// kvtool C API implementation (see kvtool.h).
#include "kvtool.h"

#ifndef KVTOOL_PATCH_HASH
#    define KVTOOL_PATCH_HASH "unknown"
#endif
#ifndef KVTOOL_BACKEND
#    define KVTOOL_BACKEND "cpu"
#endif

extern "C" int kvtool_runtime_version(void) {
    return KVTOOL_RUNTIME_VERSION;
}

extern "C" const char * kvtool_patch_hash(void) {
    return KVTOOL_PATCH_HASH;
}

extern "C" const char * kvtool_backend(void) {
    return KVTOOL_BACKEND;
}
