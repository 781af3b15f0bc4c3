// edgeq_platform.h: what each platform file (platform_*.cc) provides besides the protocol's hooks
// (edgeq_serial_read_byte, edgeq_serial_write, edgeq_cycles, declared in edgeq_protocol.h).
#ifndef EDGEQ_PLATFORM_H_
#define EDGEQ_PLATFORM_H_

#include <stdint.h>

// Bring up the serial port and the cycle counter; called once, first thing.
void edgeq_platform_init(void);

// How many edgeq_cycles() ticks make one second (0 if unknown).
uint32_t edgeq_platform_clock_hz(void);

// EDGEQ_FLAG_* bits for the INFO frame (no cycle counter, cycles are host nanoseconds).
uint32_t edgeq_platform_flags(void);

// A value that differs from one boot to the next, so the host notices a reset mid-evaluation.
uint32_t edgeq_platform_boot_nonce(void);

#endif  // EDGEQ_PLATFORM_H_
