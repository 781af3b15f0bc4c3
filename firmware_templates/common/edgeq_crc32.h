// CRC-32 (IEEE 802.3 / zlib: reflected poly 0xEDB88320, init and xorout 0xFFFFFFFF) of the model bytes,
// so the host can check the board holds the model it is comparing against (zlib.crc32 on the host).
// Plain C++11, header-only, no allocation; a 16-entry nibble table keeps it small in flash.
#ifndef EDGEQ_CRC32_H_
#define EDGEQ_CRC32_H_

#include <stdint.h>

// Pass the previous return value as crc to continue over several chunks; start with 0.
inline uint32_t edgeq_crc32(const uint8_t* data, uint32_t len, uint32_t crc = 0) {
  static const uint32_t kNibble[16] = {
      0x00000000u, 0x1DB71064u, 0x3B6E20C8u, 0x26D930ACu, 0x76DC4190u, 0x6B6B51F4u,
      0x4DB26158u, 0x5005713Cu, 0xEDB88320u, 0xF00F9344u, 0xD6D6A3E8u, 0xCB61B38Cu,
      0x9B64C2B0u, 0x86D3D2D4u, 0xA00AE278u, 0xBDBDF21Cu};
  crc = ~crc;
  for (uint32_t i = 0; i < len; ++i) {
    crc ^= data[i];
    crc = (crc >> 4) ^ kNibble[crc & 0x0Fu];
    crc = (crc >> 4) ^ kNibble[crc & 0x0Fu];
  }
  return ~crc;
}

#endif  // EDGEQ_CRC32_H_
