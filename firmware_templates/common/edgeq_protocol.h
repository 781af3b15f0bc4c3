// edgeq device protocol, firmware side: answers HELLO with INFO and INFER with RESULT over a serial link.
// Plain C++11, no TFLM dependency, no heap: two static frame buffers of EDGEQ_MAX_PAYLOAD + 6 bytes.
// Byte layouts: deploy/device/PROTOCOL.md. Frames: 0xA5, type, u16 length (LE), payload, CRC-16 (LE)
// where the CRC is CRC-16/CCITT-FALSE over type, length and payload.
#ifndef EDGEQ_PROTOCOL_H_
#define EDGEQ_PROTOCOL_H_

#include <stdint.h>

// Largest payload in either direction; INFER needs 4 + input bytes, RESULT 8 + output bytes.
#ifndef EDGEQ_MAX_PAYLOAD
#define EDGEQ_MAX_PAYLOAD 4096
#endif
#if EDGEQ_MAX_PAYLOAD > 65535 || EDGEQ_MAX_PAYLOAD < 128
#error "EDGEQ_MAX_PAYLOAD must be between 128 and 65535 (the length field is 16 bits)"
#endif

#define EDGEQ_PROTOCOL_VERSION 1
#define EDGEQ_MAGIC 0xA5
#define EDGEQ_MAX_DIMS 6
#define EDGEQ_FRAME_OVERHEAD 6  // magic, type, length (2), CRC (2)

// Frame types: host -> device below 0x80, device -> host from 0x80.
#define EDGEQ_FRAME_HELLO 0x01
#define EDGEQ_FRAME_INFER 0x02
#define EDGEQ_FRAME_INFO 0x81
#define EDGEQ_FRAME_RESULT 0x82
#define EDGEQ_FRAME_ERROR 0xEE

// ERROR codes.
#define EDGEQ_ERR_BAD_CRC 1           // a frame arrived whose CRC-16 did not match
#define EDGEQ_ERR_TOO_LONG 2          // a frame announced more than EDGEQ_MAX_PAYLOAD bytes
#define EDGEQ_ERR_BAD_INPUT_LENGTH 3  // INFER carried a different number of bytes than the input tensor has
#define EDGEQ_ERR_INFER_FAILED 4      // the infer callback returned non-zero or overflowed the output

// INFO flags.
#define EDGEQ_FLAG_CYCLES_ARE_HOST_NS 0x1u  // "cycles" are host nanoseconds (virtual board), not MCU cycles
#define EDGEQ_FLAG_NO_CYCLE_COUNTER 0x2u    // the platform has no cycle counter; cycles are meaningless

// Tensor dtypes use TFLite's TensorType numbers.
#define EDGEQ_DTYPE_FLOAT32 0
#define EDGEQ_DTYPE_FLOAT16 1
#define EDGEQ_DTYPE_INT32 2
#define EDGEQ_DTYPE_UINT8 3
#define EDGEQ_DTYPE_INT64 4
#define EDGEQ_DTYPE_BOOL 6
#define EDGEQ_DTYPE_INT16 7
#define EDGEQ_DTYPE_INT8 9

struct EdgeqTensorInfo {
  uint8_t dtype;                  // EDGEQ_DTYPE_* (TFLite TensorType)
  uint8_t ndim;                   // <= EDGEQ_MAX_DIMS
  uint32_t dims[EDGEQ_MAX_DIMS];  // first ndim used, e.g. {1, 28, 28, 1}
  float scale;                    // affine quantization (per tensor); 0 when not quantized
  int32_t zero_point;
};

struct EdgeqDeviceInfo {
  uint32_t model_len;    // bytes of the .tflite flatbuffer in flash
  uint32_t model_crc32;  // edgeq_crc32(model, model_len) (edgeq_crc32.h)
  uint32_t arena_used;   // interpreter->arena_used_bytes() after AllocateTensors
  uint32_t clock_hz;     // frequency of the counter behind edgeq_cycles()
  uint32_t boot_nonce;   // differs on every boot (counter in retained RAM, RNG, ...) so a reset is visible
  uint32_t flags;        // EDGEQ_FLAG_*
  EdgeqTensorInfo input;
  EdgeqTensorInfo output;
};

// Runs one inference: in_len input bytes in, writes at most out_cap output bytes and sets *out_len.
// May set *cycles; if it leaves it 0 the protocol reports edgeq_cycles() measured around the call.
// Returns 0 on success, anything else is sent to the host as ERROR EDGEQ_ERR_INFER_FAILED.
typedef int (*edgeq_infer_fn)(void* ctx, const uint8_t* in, uint32_t in_len, uint8_t* out, uint32_t out_cap,
                              uint32_t* out_len, uint32_t* cycles);

// Serves the protocol forever: reads bytes, answers frames. Never returns.
void edgeq_protocol_serve(const EdgeqDeviceInfo* info, edgeq_infer_fn infer, void* ctx);

// One step of edgeq_protocol_serve (for platforms that must do other work between bytes):
// polls at most one byte and answers a frame when one completes.
void edgeq_protocol_poll(const EdgeqDeviceInfo* info, edgeq_infer_fn infer, void* ctx);

// CRC-16/CCITT-FALSE (poly 0x1021, init 0xFFFF, no reflection, xorout 0): "123456789" -> 0x29B1.
uint16_t edgeq_crc16(const uint8_t* data, uint32_t len, uint16_t crc = 0xFFFFu);

// Hooks the platform provides.
extern "C" int edgeq_serial_read_byte(void);  // -1 when no byte yet
extern "C" void edgeq_serial_write(const uint8_t* data, uint32_t len);
extern "C" uint32_t edgeq_cycles(void);

#endif  // EDGEQ_PROTOCOL_H_
