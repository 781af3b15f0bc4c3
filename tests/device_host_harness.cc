// Host harness for the firmware-side protocol: the serial hooks run on file descriptors 0/1 (the test
// hands it a pseudo-terminal's master side) and infer is a deterministic stand-in for TFLM, so the
// Python host can be checked against the real C++ framing, CRCs and sequence numbers.
// Usage: device_host_harness MODEL_FILE BOOT_NONCE
#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

#include "edgeq_crc32.h"
#include "edgeq_protocol.h"

extern "C" int edgeq_serial_read_byte(void) {
  struct pollfd p = {0, POLLIN, 0};
  if (poll(&p, 1, 5) <= 0) return -1;
  uint8_t b;
  const ssize_t n = read(0, &b, 1);
  if (n == 1) return b;
  if (n < 0 && (errno == EAGAIN || errno == EINTR)) return -1;
  _exit(0);  // the other side is gone
}

extern "C" void edgeq_serial_write(const uint8_t* data, uint32_t len) {
  while (len) {
    const ssize_t n = write(1, data, len);
    if (n < 0) {
      if (errno == EINTR || errno == EAGAIN) continue;
      _exit(1);
    }
    data += n;
    len -= static_cast<uint32_t>(n);
  }
}

extern "C" uint32_t edgeq_cycles(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<uint32_t>(static_cast<uint64_t>(ts.tv_sec) * 1000000000ull + ts.tv_nsec);
}

// out[j] = int8 wrap of the sum of the inputs i with i % n_out == j (tests/test_device_protocol.py mirrors it).
static int echo_infer(void* ctx, const uint8_t* in, uint32_t in_len, uint8_t* out, uint32_t out_cap,
                      uint32_t* out_len, uint32_t* cycles) {
  const EdgeqDeviceInfo* info = static_cast<const EdgeqDeviceInfo*>(ctx);
  const uint32_t n_out = info->output.dims[1];
  if (n_out > out_cap) return 7;
  int32_t acc[16] = {0};
  for (uint32_t i = 0; i < in_len; ++i) acc[i % n_out] += static_cast<int8_t>(in[i]);
  for (uint32_t j = 0; j < n_out; ++j) out[j] = static_cast<uint8_t>(static_cast<int8_t>(acc[j] & 0xFF));
  *out_len = n_out;
  (void)cycles;  // left 0: the protocol measures edgeq_cycles() around the call
  return 0;
}

static uint8_t g_model[1 << 20];

int main(int argc, char** argv) {
  if (argc != 3) return 2;
  FILE* f = fopen(argv[1], "rb");
  if (!f) return 2;
  const size_t n = fread(g_model, 1, sizeof(g_model), f);
  fclose(f);
  EdgeqDeviceInfo info = {};
  info.model_len = static_cast<uint32_t>(n);
  info.model_crc32 = edgeq_crc32(g_model, info.model_len);
  info.arena_used = 12345;
  info.clock_hz = 1000000000u;
  info.boot_nonce = static_cast<uint32_t>(strtoul(argv[2], 0, 0));
  info.flags = EDGEQ_FLAG_CYCLES_ARE_HOST_NS;
  info.input.dtype = EDGEQ_DTYPE_INT8;
  info.input.ndim = 4;
  info.input.dims[0] = 1;
  info.input.dims[1] = 8;
  info.input.dims[2] = 8;
  info.input.dims[3] = 1;
  info.input.scale = 0.00390625f;
  info.input.zero_point = -128;
  info.output.dtype = EDGEQ_DTYPE_INT8;
  info.output.ndim = 2;
  info.output.dims[0] = 1;
  info.output.dims[1] = 10;
  info.output.scale = 0.125f;
  info.output.zero_point = 3;
  edgeq_protocol_serve(&info, echo_infer, &info);
}
