// mps2_an386.h: the few registers of QEMU's mps2-an386 that the edgeq firmware touches.
//
// Addresses from QEMU's hw/arm/mps2.c (UART0 at 0x40004000, CMSDK APB timer 0 at 0x40000000, both on the
// 25 MHz SYSCLK) and the register layouts of hw/char/cmsdk-apb-uart.c and hw/timer/cmsdk-apb-timer.c
// (ARM's Cortex-M System Design Kit TRM, DDI0479); the SCB ones are ARMv7-M's.
#ifndef EDGEQ_MPS2_AN386_H_
#define EDGEQ_MPS2_AN386_H_

#include <stdint.h>

#define MPS2_SYSCLK_HZ 25000000u

#define MPS2_REG(addr) (*(volatile uint32_t*)(addr))

// CMSDK APB UART 0: QEMU connects it to the first -serial / -chardev.
#define MPS2_UART0_BASE 0x40004000u
#define MPS2_UART0_DATA MPS2_REG(MPS2_UART0_BASE + 0x00u)
#define MPS2_UART0_STATE MPS2_REG(MPS2_UART0_BASE + 0x04u)
#define MPS2_UART0_CTRL MPS2_REG(MPS2_UART0_BASE + 0x08u)
#define MPS2_UART0_INTSTATUS MPS2_REG(MPS2_UART0_BASE + 0x0Cu)
#define MPS2_UART0_BAUDDIV MPS2_REG(MPS2_UART0_BASE + 0x10u)
#define MPS2_UART_STATE_TXFULL (1u << 0)
#define MPS2_UART_STATE_RXFULL (1u << 1)
#define MPS2_UART_CTRL_TX_EN (1u << 0)
#define MPS2_UART_CTRL_RX_EN (1u << 1)

// CMSDK APB timer 0: a 32-bit down-counter on SYSCLK.
#define MPS2_TIMER0_BASE 0x40000000u
#define MPS2_TIMER0_CTRL MPS2_REG(MPS2_TIMER0_BASE + 0x00u)
#define MPS2_TIMER0_VALUE MPS2_REG(MPS2_TIMER0_BASE + 0x04u)
#define MPS2_TIMER0_RELOAD MPS2_REG(MPS2_TIMER0_BASE + 0x08u)
#define MPS2_TIMER_CTRL_EN (1u << 0)

// System control block (ARMv7-M).
#define MPS2_SCB_CPACR MPS2_REG(0xE000ED88u)
#define MPS2_SCB_CFSR MPS2_REG(0xE000ED28u)
#define MPS2_SCB_HFSR MPS2_REG(0xE000ED2Cu)

// Semihosting SYS_WRITE0 (0x04): s goes to QEMU's own output (its stderr/log), when semihosting is on.
static inline void mps2_semihosting_write0(const char* s) {
  register uint32_t r0 __asm__("r0") = 0x04u;
  register const char* r1 __asm__("r1") = s;
  __asm volatile("bkpt 0xAB" : "+r"(r0) : "r"(r1) : "memory");
}

// Semihosting SYS_EXIT (0x18): ends QEMU when it runs with -semihosting-config enable=on; status 0 is
// ADP_Stopped_ApplicationExit, anything else ADP_Stopped_RunTimeErrorUnknown (QEMU exits 1).
static inline void mps2_semihosting_exit(int status) {
  register uint32_t r0 __asm__("r0") = 0x18u;
  register uint32_t r1 __asm__("r1") = status == 0 ? 0x20026u : 0x20024u;
  __asm volatile("bkpt 0xAB" : : "r"(r0), "r"(r1) : "memory");
}

#endif  // EDGEQ_MPS2_AN386_H_
