// startup_mps2_an386.c: vector table and reset handler for QEMU's mps2-an386 (Cortex-M4 with FPU).
//
// Reset: enable the FPU (the firmware is built with -mfloat-abi=hard, so the first VFP instruction would
// fault with the coprocessor off), copy .data from its load address, zero .bss, run the C++ constructors,
// call main(). A fault (or any unexpected exception) prints one line on UART 0 and on QEMU's log and ends
// QEMU through semihosting (run it with -semihosting-config enable=on): a crash shows as an exit with a
// message rather than a silent hang.
#include <stdint.h>

#include "mps2_an386.h"

extern uint32_t _sidata, _sdata, _edata, _sbss, _ebss, __stack_top;
extern int main(void);
extern void __libc_init_array(void);

void Reset_Handler(void);
void Default_Handler(void);
void HardFault_Handler(void);

// -nostartfiles drops crti.o/crtbegin.o: __libc_init_array still calls _init, and the registrations of
// C++ static destructors (never run: main does not return) name __dso_handle.
void _init(void) {}
void _fini(void) {}
void* __dso_handle = &__dso_handle;

void Reset_Handler(void) {
  MPS2_SCB_CPACR |= (0xFu << 20);  // CP10 and CP11: full access
  __asm volatile("dsb\n\tisb" ::: "memory");
  const uint32_t* src = &_sidata;
  for (uint32_t* dst = &_sdata; dst < &_edata;) *dst++ = *src++;
  for (uint32_t* dst = &_sbss; dst < &_ebss;) *dst++ = 0u;
  __libc_init_array();
  main();
  mps2_semihosting_exit(0);
  for (;;) {
  }
}

static char* fault_put(char* p, const char* s) {
  while (*s) *p++ = *s++;
  return p;
}

static char* fault_put_hex(char* p, uint32_t v) {
  p = fault_put(p, "0x");
  for (int i = 7; i >= 0; --i) *p++ = "0123456789abcdef"[(v >> (4 * i)) & 0xFu];
  return p;
}

// Reports the exception number, the stacked PC and LR and the fault status on UART 0 and on QEMU's own
// output (semihosting SYS_WRITE0: QEMU may exit before a reader drains the UART's pty), then ends QEMU.
__attribute__((used)) static void fault_report(const uint32_t* frame) {
  uint32_t ipsr;
  __asm volatile("mrs %0, ipsr" : "=r"(ipsr));
  char msg[128];
  char* p = fault_put(msg, "\r\nedgeq: fault, exception ");
  p = fault_put_hex(p, ipsr & 0x1FFu);
  p = fault_put(p, " pc ");
  p = fault_put_hex(p, frame[6]);
  p = fault_put(p, " lr ");
  p = fault_put_hex(p, frame[5]);
  p = fault_put(p, " cfsr ");
  p = fault_put_hex(p, MPS2_SCB_CFSR);
  p = fault_put(p, " hfsr ");
  p = fault_put_hex(p, MPS2_SCB_HFSR);
  p = fault_put(p, "\r\n");
  *p = '\0';
  for (const char* s = msg; *s; ++s) {
    while (MPS2_UART0_STATE & MPS2_UART_STATE_TXFULL) {
    }
    MPS2_UART0_DATA = (uint32_t)(uint8_t)*s;
  }
  mps2_semihosting_write0(msg + 2);
  mps2_semihosting_exit(1);
  for (;;) {
  }
}

// Picks the stack the faulting code used (EXC_RETURN bit 2) and hands its exception frame to fault_report.
__attribute__((naked)) void HardFault_Handler(void) {
  __asm volatile(
      "tst lr, #4\n\t"
      "ite eq\n\t"
      "mrseq r0, msp\n\t"
      "mrsne r0, psp\n\t"
      "b fault_report\n\t");
}

// Every other exception and interrupt is unexpected: reported like a fault (IPSR names which one).
#define WEAK_ALIAS __attribute__((weak, alias("HardFault_Handler")))
void Default_Handler(void) WEAK_ALIAS;
void NMI_Handler(void) WEAK_ALIAS;
void MemManage_Handler(void) WEAK_ALIAS;
void BusFault_Handler(void) WEAK_ALIAS;
void UsageFault_Handler(void) WEAK_ALIAS;
void SVC_Handler(void) WEAK_ALIAS;
void DebugMon_Handler(void) WEAK_ALIAS;
void PendSV_Handler(void) WEAK_ALIAS;
void SysTick_Handler(void) WEAK_ALIAS;

// 16 core exceptions + the 32 external interrupts QEMU's mps2-an386 wires (num-irq 32); none is enabled.
typedef void (*vector_fn)(void);
#define IRQ8(h) h, h, h, h, h, h, h, h
__attribute__((section(".isr_vector"), used)) const vector_fn g_vectors[16 + 32] = {
    (vector_fn)(uintptr_t)&__stack_top,
    Reset_Handler,
    NMI_Handler,
    HardFault_Handler,
    MemManage_Handler,
    BusFault_Handler,
    UsageFault_Handler,
    0,
    0,
    0,
    0,
    SVC_Handler,
    DebugMon_Handler,
    0,
    PendSV_Handler,
    SysTick_Handler,
    IRQ8(Default_Handler), IRQ8(Default_Handler), IRQ8(Default_Handler), IRQ8(Default_Handler),
};
