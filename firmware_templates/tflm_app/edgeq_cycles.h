// edgeq_cycles.h: the Cortex-M DWT cycle counter where the core has one (ARMv7-M, ARMv7E-M, ARMv8-M
// Mainline, ARMv8.1-M Mainline). Cortex-M0/M0+/M23 have no CYCCNT: EDGEQ_HAVE_DWT is 0 there and
// the platform file falls back to a timer.
#ifndef EDGEQ_CYCLES_H_
#define EDGEQ_CYCLES_H_

#include <stdint.h>

#if defined(__ARM_ARCH_7M__) || defined(__ARM_ARCH_7EM__) || defined(__ARM_ARCH_8M_MAIN__) || \
    defined(__ARM_ARCH_8_1M_MAIN__)
#define EDGEQ_HAVE_DWT 1

// Addresses from the ARMv7-M / ARMv8-M architecture manuals, so no CMSIS device header is needed.
#define EDGEQ_DEMCR (*(volatile uint32_t*)0xE000EDFCu)
#define EDGEQ_DWT_CTRL (*(volatile uint32_t*)0xE0001000u)
#define EDGEQ_DWT_CYCCNT (*(volatile uint32_t*)0xE0001004u)
#define EDGEQ_DWT_LAR (*(volatile uint32_t*)0xE0001FB0u)

// Start CYCCNT; returns 0 where the DWT was built without a cycle counter (DWT_CTRL.NOCYCCNT).
static inline int edgeq_dwt_enable(void) {
  EDGEQ_DEMCR |= (1u << 24);  // TRCENA: power the DWT
#if defined(__ARM_ARCH_7EM__)
  EDGEQ_DWT_LAR = 0xC5ACCE55u;  // Cortex-M7 locks DWT writes until this key is written
#endif
  if (EDGEQ_DWT_CTRL & (1u << 25)) return 0;
  EDGEQ_DWT_CYCCNT = 0;
  EDGEQ_DWT_CTRL |= 1u;  // CYCCNTENA
  return 1;
}

static inline uint32_t edgeq_dwt_cycles(void) { return EDGEQ_DWT_CYCCNT; }

#else
#define EDGEQ_HAVE_DWT 0
#endif

#endif  // EDGEQ_CYCLES_H_
