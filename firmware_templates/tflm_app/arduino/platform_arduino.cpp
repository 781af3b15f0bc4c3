// platform_arduino.cpp: serial over the Arduino Serial object; cycles from the DWT on Cortex-M3/M4/M7/M33,
// from the CPU's cycle counter on ESP32, from micros() elsewhere (e.g. RP2040's Cortex-M0+).
// Every hook is weak: define your own in another file of the sketch to override it.
#include <Arduino.h>
#include <stdint.h>

#include "edgeq_cycles.h"
#include "edgeq_platform.h"
#include "edgeq_protocol.h"

#ifndef EDGEQ_BAUD
#define EDGEQ_BAUD 115200
#endif

namespace {
int g_dwt_running = 0;
}  // namespace

__attribute__((weak)) void edgeq_platform_init(void) {
  Serial.begin(EDGEQ_BAUD);
  // Boards with native USB serial: wait (at most 3 s) for the host to open the port.
  const unsigned long start = millis();
  while (!Serial && millis() - start < 3000) {
  }
#if EDGEQ_HAVE_DWT
  g_dwt_running = edgeq_dwt_enable();
#endif
}

__attribute__((weak)) uint32_t edgeq_platform_clock_hz(void) {
#if defined(ARDUINO_ARCH_ESP32)
  return static_cast<uint32_t>(ESP.getCpuFreqMHz()) * 1000000u;
#elif defined(F_CPU)
  return static_cast<uint32_t>(F_CPU);
#else
  return 1000000u;  // micros() ticks
#endif
}

__attribute__((weak)) uint32_t edgeq_platform_flags(void) { return 0; }

__attribute__((weak)) uint32_t edgeq_platform_boot_nonce(void) {
#if defined(ARDUINO_ARCH_ESP32)
  return esp_random();
#else
  // Time since reset: varies with how long the host took to open the port (boards with native USB).
  return static_cast<uint32_t>(micros()) ^ edgeq_cycles();
#endif
}

__attribute__((weak)) int edgeq_serial_read_byte(void) { return Serial.available() > 0 ? Serial.read() : -1; }

__attribute__((weak)) void edgeq_serial_write(const uint8_t* data, uint32_t len) { Serial.write(data, len); }

__attribute__((weak)) uint32_t edgeq_cycles(void) {
#if EDGEQ_HAVE_DWT
  if (g_dwt_running) return edgeq_dwt_cycles();
#endif
#if defined(ARDUINO_ARCH_ESP32)
  return ESP.getCycleCount();
#elif defined(F_CPU)
  return static_cast<uint32_t>(micros()) * static_cast<uint32_t>(F_CPU / 1000000UL);
#else
  return static_cast<uint32_t>(micros());
#endif
}
