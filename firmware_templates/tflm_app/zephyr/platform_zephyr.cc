// platform_zephyr.cc: serial by polling the console UART (zephyr,console in the devicetree) and the
// kernel's hardware cycle counter. Every hook is weak: define your own in another file to override it.
#include <stdint.h>

#include <zephyr/device.h>
#include <zephyr/devicetree.h>
#include <zephyr/drivers/uart.h>
#include <zephyr/kernel.h>

#include "edgeq_platform.h"
#include "edgeq_protocol.h"

namespace {
const struct device* const g_uart = DEVICE_DT_GET(DT_CHOSEN(zephyr_console));
// Survives a warm reset (Zephyr leaves __noinit RAM alone); random after power-on.
__noinit uint32_t g_boot_count;
}  // namespace

__attribute__((weak)) void edgeq_platform_init(void) {}

__attribute__((weak)) uint32_t edgeq_platform_clock_hz(void) {
  return static_cast<uint32_t>(sys_clock_hw_cycles_per_sec());
}

__attribute__((weak)) uint32_t edgeq_platform_flags(void) { return 0; }

__attribute__((weak)) uint32_t edgeq_platform_boot_nonce(void) {
  g_boot_count += 1;
  return g_boot_count ^ k_cycle_get_32();
}

__attribute__((weak)) int edgeq_serial_read_byte(void) {
  unsigned char c;
  if (!device_is_ready(g_uart) || uart_poll_in(g_uart, &c) != 0) return -1;
  return c;
}

__attribute__((weak)) void edgeq_serial_write(const uint8_t* data, uint32_t len) {
  if (!device_is_ready(g_uart)) return;
  for (uint32_t i = 0; i < len; ++i) uart_poll_out(g_uart, data[i]);
}

__attribute__((weak)) uint32_t edgeq_cycles(void) { return k_cycle_get_32(); }
