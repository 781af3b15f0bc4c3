// edgeq device protocol, firmware side (see edgeq_protocol.h and deploy/device/PROTOCOL.md).
#include "edgeq_protocol.h"

#include <string.h>

namespace {

const uint32_t kFrameCap = EDGEQ_MAX_PAYLOAD + EDGEQ_FRAME_OVERHEAD;
const uint32_t kNoSeq = 0xFFFFFFFFu;

// The frame being received (from its magic byte on) and the frame being sent: the only buffers.
// INFER's input is handed to the callback in place and the output is written straight into the reply.
uint8_t g_rx[kFrameCap];
uint32_t g_rx_n = 0;
uint32_t g_last_byte_cycles = 0;
uint8_t g_tx[kFrameCap];

void put_u16(uint8_t* p, uint32_t v) {
  p[0] = static_cast<uint8_t>(v);
  p[1] = static_cast<uint8_t>(v >> 8);
}

void put_u32(uint8_t* p, uint32_t v) {
  put_u16(p, v & 0xFFFFu);
  put_u16(p + 2, v >> 16);
}

uint32_t get_u32(const uint8_t* p) {
  return static_cast<uint32_t>(p[0]) | (static_cast<uint32_t>(p[1]) << 8) |
         (static_cast<uint32_t>(p[2]) << 16) | (static_cast<uint32_t>(p[3]) << 24);
}

uint8_t* tx_payload() { return g_tx + 4; }

void send_frame(uint8_t type, uint32_t len) {
  g_tx[0] = EDGEQ_MAGIC;
  g_tx[1] = type;
  put_u16(g_tx + 2, len);
  put_u16(g_tx + 4 + len, edgeq_crc16(g_tx + 1, 3 + len));
  edgeq_serial_write(g_tx, len + EDGEQ_FRAME_OVERHEAD);
}

// ERROR: u16 code, u32 seq, text. Text comes from string literals plus an optional number.
void send_error(uint16_t code, uint32_t seq, const char* text, int32_t number = 0, bool with_number = false) {
  uint8_t* p = tx_payload();
  put_u16(p, code);
  put_u32(p + 2, seq);
  uint32_t n = 6;
  for (const char* c = text; *c && n < EDGEQ_MAX_PAYLOAD - 12; ++c) p[n++] = static_cast<uint8_t>(*c);
  if (with_number) {
    char digits[12];
    uint32_t k = 0;
    uint32_t v = number < 0 ? 0u - static_cast<uint32_t>(number) : static_cast<uint32_t>(number);
    do {
      digits[k++] = static_cast<char>('0' + v % 10);
      v /= 10;
    } while (v);
    if (number < 0) p[n++] = '-';
    while (k) p[n++] = static_cast<uint8_t>(digits[--k]);
  }
  send_frame(EDGEQ_FRAME_ERROR, n);
}

uint32_t put_tensor(uint8_t* p, const EdgeqTensorInfo& t) {
  p[0] = t.dtype;
  p[1] = t.ndim;
  put_u16(p + 2, 0);
  for (uint32_t i = 0; i < EDGEQ_MAX_DIMS; ++i) put_u32(p + 4 + 4 * i, i < t.ndim ? t.dims[i] : 0u);
  uint32_t bits;
  memcpy(&bits, &t.scale, sizeof(bits));  // IEEE-754 binary32, sent little-endian like every integer
  put_u32(p + 4 + 4 * EDGEQ_MAX_DIMS, bits);
  put_u32(p + 8 + 4 * EDGEQ_MAX_DIMS, static_cast<uint32_t>(t.zero_point));
  return 12 + 4 * EDGEQ_MAX_DIMS;
}

void send_info(const EdgeqDeviceInfo* info) {
  uint8_t* p = tx_payload();
  p[0] = EDGEQ_PROTOCOL_VERSION;
  p[1] = 0;
  put_u16(p + 2, EDGEQ_MAX_PAYLOAD);
  put_u32(p + 4, info->model_len);
  put_u32(p + 8, info->model_crc32);
  put_u32(p + 12, info->arena_used);
  put_u32(p + 16, info->clock_hz);
  put_u32(p + 20, info->boot_nonce);
  put_u32(p + 24, info->flags);
  uint32_t n = 28;
  n += put_tensor(p + n, info->input);
  n += put_tensor(p + n, info->output);
  send_frame(EDGEQ_FRAME_INFO, n);
}

// Bytes the input tensor holds, or 0 when the dtype is unknown (then the length is not checked).
uint32_t tensor_bytes(const EdgeqTensorInfo& t) {
  uint32_t size;
  switch (t.dtype) {
    case EDGEQ_DTYPE_FLOAT32:
    case EDGEQ_DTYPE_INT32: size = 4; break;
    case EDGEQ_DTYPE_INT64: size = 8; break;
    case EDGEQ_DTYPE_FLOAT16:
    case EDGEQ_DTYPE_INT16: size = 2; break;
    case EDGEQ_DTYPE_UINT8:
    case EDGEQ_DTYPE_INT8:
    case EDGEQ_DTYPE_BOOL: size = 1; break;
    default: return 0;
  }
  for (uint32_t i = 0; i < t.ndim && i < EDGEQ_MAX_DIMS; ++i) size *= t.dims[i];
  return size;
}

void handle_infer(const EdgeqDeviceInfo* info, edgeq_infer_fn infer, void* ctx, const uint8_t* payload,
                  uint32_t len) {
  if (len < 4) {
    send_error(EDGEQ_ERR_BAD_INPUT_LENGTH, kNoSeq, "INFER shorter than its 4-byte sequence number");
    return;
  }
  const uint32_t seq = get_u32(payload);
  const uint32_t in_len = len - 4;
  const uint32_t expected = tensor_bytes(info->input);
  if (expected && in_len != expected) {
    send_error(EDGEQ_ERR_BAD_INPUT_LENGTH, seq, "input bytes expected: ", static_cast<int32_t>(expected), true);
    return;
  }
  uint8_t* out = tx_payload() + 8;
  const uint32_t out_cap = EDGEQ_MAX_PAYLOAD - 8;
  uint32_t out_len = 0;
  uint32_t cycles = 0;
  const uint32_t t0 = edgeq_cycles();
  const int rc = infer(ctx, payload + 4, in_len, out, out_cap, &out_len, &cycles);
  const uint32_t t1 = edgeq_cycles();
  if (rc != 0) {
    send_error(EDGEQ_ERR_INFER_FAILED, seq, "infer callback returned ", rc, true);
    return;
  }
  if (out_len > out_cap) {
    send_error(EDGEQ_ERR_INFER_FAILED, seq, "output larger than EDGEQ_MAX_PAYLOAD - 8: ",
               static_cast<int32_t>(out_len), true);
    return;
  }
  if (cycles == 0) cycles = t1 - t0;  // unsigned arithmetic survives one counter wrap
  put_u32(tx_payload(), seq);
  put_u32(tx_payload() + 4, cycles);
  send_frame(EDGEQ_FRAME_RESULT, 8 + out_len);
}

// 0: need more bytes; 1: g_rx holds one whole valid frame; -1: not a frame (an ERROR may have been sent).
int check_rx() {
  if (g_rx_n < 2) return 0;
  // Unknown types are dropped silently: on a noisy line they are far more often garbage than a request.
  if (g_rx[1] != EDGEQ_FRAME_HELLO && g_rx[1] != EDGEQ_FRAME_INFER) return -1;
  if (g_rx_n < 4) return 0;
  const uint32_t len = static_cast<uint32_t>(g_rx[2]) | (static_cast<uint32_t>(g_rx[3]) << 8);
  if (len > EDGEQ_MAX_PAYLOAD) {
    send_error(EDGEQ_ERR_TOO_LONG, kNoSeq, "frame longer than EDGEQ_MAX_PAYLOAD: ", static_cast<int32_t>(len),
               true);
    return -1;
  }
  if (g_rx_n < len + EDGEQ_FRAME_OVERHEAD) return 0;
  const uint16_t got = static_cast<uint16_t>(g_rx[4 + len] | (g_rx[5 + len] << 8));
  if (edgeq_crc16(g_rx + 1, 3 + len) != got) {
    send_error(EDGEQ_ERR_BAD_CRC, kNoSeq, "CRC-16 mismatch; resend");
    return -1;
  }
  return 1;
}

// Resynchronise: the candidate starting at g_rx[0] was not a frame, so restart at the next magic byte
// inside it (a real frame may have begun within the bytes the false start swallowed).
void drop_candidate() {
  uint32_t k = 1;
  while (k < g_rx_n && g_rx[k] != EDGEQ_MAGIC) ++k;
  g_rx_n -= k;
  memmove(g_rx, g_rx + k, g_rx_n);
}

void process(const EdgeqDeviceInfo* info, edgeq_infer_fn infer, void* ctx) {
  for (;;) {
    const int r = check_rx();
    if (r == 0) return;
    if (r == 1) {
      const uint32_t len = static_cast<uint32_t>(g_rx[2]) | (static_cast<uint32_t>(g_rx[3]) << 8);
      g_rx_n = 0;  // the payload stays valid in g_rx until the next byte is read
      if (g_rx[1] == EDGEQ_FRAME_HELLO) {
        send_info(info);
      } else {
        handle_infer(info, infer, ctx, g_rx + 4, len);
      }
      return;
    }
    drop_candidate();
  }
}

}  // namespace

uint16_t edgeq_crc16(const uint8_t* data, uint32_t len, uint16_t crc) {
  for (uint32_t i = 0; i < len; ++i) {
    crc ^= static_cast<uint16_t>(data[i]) << 8;
    for (int b = 0; b < 8; ++b) {
      crc = (crc & 0x8000u) ? static_cast<uint16_t>((crc << 1) ^ 0x1021u) : static_cast<uint16_t>(crc << 1);
    }
  }
  return crc;
}

void edgeq_protocol_poll(const EdgeqDeviceInfo* info, edgeq_infer_fn infer, void* ctx) {
  const int b = edgeq_serial_read_byte();
  if (b < 0) {
    // A half frame that stalls for 100 ms was most likely a false start in line noise: rescan it.
    if (g_rx_n && info->clock_hz && edgeq_cycles() - g_last_byte_cycles > info->clock_hz / 10u) {
      drop_candidate();
      process(info, infer, ctx);
      g_last_byte_cycles = edgeq_cycles();
    }
    return;
  }
  g_last_byte_cycles = edgeq_cycles();
  if (g_rx_n == 0 && b != EDGEQ_MAGIC) return;  // noise between frames
  g_rx[g_rx_n++] = static_cast<uint8_t>(b);
  process(info, infer, ctx);
}

void edgeq_protocol_serve(const EdgeqDeviceInfo* info, edgeq_infer_fn infer, void* ctx) {
  for (;;) edgeq_protocol_poll(info, infer, ctx);
}
