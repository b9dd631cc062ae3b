// random.h - unguessable numbers and keyed hashes for everything an attacker must not predict:
// channel tokens, ISNs, SYN cookies, virtual-connection ids.
//
// Every value comes from the kernel's CSPRNG (getrandom); nothing here is seeded from a clock or
// a 32-bit seed. SipHash-2-4 is the keyed hash (a PRF over short inputs, as the kernel uses for
// SYN cookies and sequence numbers): without the key, its output cannot be predicted or forged.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <span>

namespace netch {

// Fills `out` from getrandom(2). Aborts if the kernel cannot supply randomness (it always can
// after early boot): a predictable fallback would be worse than stopping.
void RandomBytes(std::span<uint8_t> out);
uint64_t RandomU64();
// Never zero (zero means "no token" / "unset" on the wire).
uint64_t RandomNonZeroU64();
uint32_t RandomU32();

using SipKey = std::array<uint8_t, 16>;
SipKey RandomSipKey();
// SipHash-2-4 of `data` under `key`.
uint64_t SipHash24(const SipKey& key, std::span<const uint8_t> data);

}  // namespace netch
