// platform_mps2_an386.cc: edgeq's platform hooks (edgeq_platform.h, edgeq_protocol.h) for QEMU's
// mps2-an386: the serial protocol on the CMSDK APB UART 0 (polled, 8N1, BAUDDIV for 115200 baud) and a
// counter on CMSDK APB timer 0. Replaces platform_generic.cc in this board's build.
//
// QEMU's TCG does not model CPU cycles: the timer follows QEMU's virtual clock (host time unless -icount),
// so the INFO frame says NO_CYCLE_COUNTER. The counter still runs at clock_hz, which is what the protocol's
// 100 ms stall timeout needs. Instructions per inference come from a QEMU TCG plugin instead
// (edgeq_insn_plugin.c), which brackets the same two edgeq_cycles() calls that main.cc puts around Invoke.
#include <stdint.h>

#include "edgeq_platform.h"
#include "edgeq_protocol.h"
#include "mps2_an386.h"

namespace {
constexpr uint32_t kBaud = 115200u;
constexpr uint32_t kBootMagic = 0xED6E0B00u;
// Kept across a warm reset (a .noinit section the image does not load); QEMU zeroes RAM at power-on.
__attribute__((section(".noinit"))) uint32_t g_boot_magic;
__attribute__((section(".noinit"))) uint32_t g_boot_count;
}  // namespace

void edgeq_platform_init(void) {
  MPS2_TIMER0_CTRL = 0u;
  MPS2_TIMER0_RELOAD = 0xFFFFFFFFu;
  MPS2_TIMER0_VALUE = 0xFFFFFFFFu;
  MPS2_TIMER0_CTRL = MPS2_TIMER_CTRL_EN;
  MPS2_UART0_BAUDDIV = MPS2_SYSCLK_HZ / kBaud;  // QEMU ignores a divisor below 16
  MPS2_UART0_CTRL = MPS2_UART_CTRL_TX_EN | MPS2_UART_CTRL_RX_EN;
}

uint32_t edgeq_platform_clock_hz(void) { return MPS2_SYSCLK_HZ; }

uint32_t edgeq_platform_flags(void) { return EDGEQ_FLAG_NO_CYCLE_COUNTER; }

uint32_t edgeq_platform_boot_nonce(void) {
  if (g_boot_magic != kBootMagic) {
    g_boot_magic = kBootMagic;
    g_boot_count = 0u;
  }
  g_boot_count += 1u;
  // The counter's value at boot varies with the host's timing; the boot count makes a reset always show.
  return (g_boot_count << 24) ^ edgeq_cycles();
}

extern "C" int edgeq_serial_read_byte(void) {
  if (!(MPS2_UART0_STATE & MPS2_UART_STATE_RXFULL)) return -1;
  return static_cast<int>(MPS2_UART0_DATA & 0xFFu);
}

extern "C" void edgeq_serial_write(const uint8_t* data, uint32_t len) {
  for (uint32_t i = 0; i < len; ++i) {
    while (MPS2_UART0_STATE & MPS2_UART_STATE_TXFULL) {
    }
    MPS2_UART0_DATA = data[i];
  }
}

// Counts up at MPS2_SYSCLK_HZ: the down-counter's complement, wrapping every 2^32 ticks.
extern "C" uint32_t edgeq_cycles(void) { return 0xFFFFFFFFu - MPS2_TIMER0_VALUE; }
