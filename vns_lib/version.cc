// version.cc - the one symbol of libnetchannel.so beyond netch_vns (which it contains whole).
#include "vns_lib/vns.h"

namespace netch::vns {
const char* Version() { return NETCH_VERSION; }
}  // namespace netch::vns
