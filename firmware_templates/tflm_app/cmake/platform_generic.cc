// platform_generic.cc: serial over stdin/stdout and a cycle counter, for the generic CMake build
// (a host, or a bare-metal target whose C library routes stdio to a UART or semihosting).
// Every hook is weak: define your own in another file to override it.
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "edgeq_cycles.h"
#include "edgeq_platform.h"
#include "edgeq_protocol.h"

#if !defined(__arm__)
#include <chrono>
#endif

// The board's core clock, set by CMakeLists.txt from the board profile (0 = unknown).
#ifndef EDGEQ_CLOCK_HZ
#define EDGEQ_CLOCK_HZ 0
#endif

#if EDGEQ_HAVE_DWT
namespace {
int g_dwt_running = 0;
}  // namespace
#endif

__attribute__((weak)) void edgeq_platform_init(void) {
#if EDGEQ_HAVE_DWT
  g_dwt_running = edgeq_dwt_enable();
#endif
}

__attribute__((weak)) uint32_t edgeq_platform_clock_hz(void) {
#if EDGEQ_HAVE_DWT
  return g_dwt_running ? EDGEQ_CLOCK_HZ : 0u;
#elif !defined(__arm__)
  return 1000000000u;  // hosts count nanoseconds
#else
  return 0u;
#endif
}

__attribute__((weak)) uint32_t edgeq_platform_flags(void) {
#if EDGEQ_HAVE_DWT
  return g_dwt_running ? 0u : EDGEQ_FLAG_NO_CYCLE_COUNTER;
#elif !defined(__arm__)
  return EDGEQ_FLAG_CYCLES_ARE_HOST_NS;
#else
  return EDGEQ_FLAG_NO_CYCLE_COUNTER;  // Cortex-M0/M0+/M23: override edgeq_cycles with a timer
#endif
}

__attribute__((weak)) uint32_t edgeq_cycles(void) {
#if EDGEQ_HAVE_DWT
  return g_dwt_running ? edgeq_dwt_cycles() : 0u;
#elif !defined(__arm__)
  static const auto t0 = std::chrono::steady_clock::now();
  return static_cast<uint32_t>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - t0).count());
#else
  return 0u;
#endif
}

__attribute__((weak)) uint32_t edgeq_platform_boot_nonce(void) {
#if !defined(__arm__)
  return static_cast<uint32_t>(std::chrono::system_clock::now().time_since_epoch().count());
#else
  // Bare metal has no entropy here: cycles since boot vary a little with the host's timing.
  // Override with your board's RNG for a nonce that always differs.
  return edgeq_cycles();
#endif
}

__attribute__((weak)) int edgeq_serial_read_byte(void) {
  const int c = getchar();
  if (c != EOF) return c;
#if defined(__unix__) || defined(__APPLE__) || defined(_WIN32)
  // On a host, end of input means the evaluator hung up: nothing more to serve.
  exit(0);
#else
  return -1;
#endif
}

__attribute__((weak)) void edgeq_serial_write(const uint8_t* data, uint32_t len) {
  fwrite(data, 1, len, stdout);
  fflush(stdout);
}
