// edgeq_insn_plugin.c: a QEMU TCG plugin (plugin API version 1, QEMU 6.x-8.x) that counts the guest
// instructions executed inside each inference window of the edgeq firmware and writes one count per line.
//
// main.cc reads edgeq_cycles() right before and right after interpreter->Invoke(). The plugin watches two
// addresses: the entry of MicroInterpreter::Invoke (invoke=0x...) and the entry of edgeq_cycles
// (cycles=0x...). The window of an Invoke runs from the last edgeq_cycles call before it to the first one
// after it, the same bracket the firmware's own cycles field measures. The first window is setup's
// zero-input Invoke at boot; with no edgeq_cycles call before it, it also holds the boot code.
//
// These are instruction counts, not cycles: TCG does not model the Cortex-M4 pipeline, wait states or
// memory timing.
//
// Build: cc -shared -fPIC -O2 -o edgeq_insn_plugin.so edgeq_insn_plugin.c
// Run:   qemu-system-arm ... -plugin edgeq_insn_plugin.so,invoke=0x1234,cycles=0x5678,out=/path/counts.txt
//
// The few API declarations it needs are written out here (they match QEMU's include/qemu/qemu-plugin.h),
// so no QEMU source tree is needed to build it.
#include <inttypes.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define EXPORT __attribute__((visibility("default")))

typedef uint64_t qemu_plugin_id_t;
typedef struct {
  const char* target_name;
  struct {
    int min;
    int cur;
  } version;
  bool system_emulation;
  union {
    struct {
      int smp_vcpus;
      int max_vcpus;
    } system;
  };
} qemu_info_t;
struct qemu_plugin_tb;
struct qemu_plugin_insn;
enum qemu_plugin_cb_flags { QEMU_PLUGIN_CB_NO_REGS, QEMU_PLUGIN_CB_R_REGS, QEMU_PLUGIN_CB_RW_REGS };
enum qemu_plugin_op { QEMU_PLUGIN_INLINE_ADD_U64 };
typedef void (*qemu_plugin_vcpu_tb_trans_cb_t)(qemu_plugin_id_t id, struct qemu_plugin_tb* tb);
typedef void (*qemu_plugin_vcpu_udata_cb_t)(unsigned int vcpu_index, void* userdata);
typedef void (*qemu_plugin_udata_cb_t)(qemu_plugin_id_t id, void* userdata);

void qemu_plugin_register_vcpu_tb_trans_cb(qemu_plugin_id_t id, qemu_plugin_vcpu_tb_trans_cb_t cb);
void qemu_plugin_register_vcpu_tb_exec_inline(struct qemu_plugin_tb* tb, enum qemu_plugin_op op, void* ptr,
                                              uint64_t imm);
void qemu_plugin_register_vcpu_insn_exec_cb(struct qemu_plugin_insn* insn, qemu_plugin_vcpu_udata_cb_t cb,
                                            enum qemu_plugin_cb_flags flags, void* userdata);
size_t qemu_plugin_tb_n_insns(const struct qemu_plugin_tb* tb);
struct qemu_plugin_insn* qemu_plugin_tb_get_insn(const struct qemu_plugin_tb* tb, size_t idx);
uint64_t qemu_plugin_insn_vaddr(const struct qemu_plugin_insn* insn);
void qemu_plugin_register_atexit_cb(qemu_plugin_id_t id, qemu_plugin_udata_cb_t cb, void* userdata);

EXPORT int qemu_plugin_version = 1;

static uint64_t g_insns;         // instructions executed so far (one vCPU: mps2-an386 has one core)
static uint64_t g_last_cycles;   // g_insns at the last edgeq_cycles entry
static uint64_t g_window_start;  // g_insns at the edgeq_cycles call before the running Invoke
static bool g_armed;             // an Invoke started and its closing edgeq_cycles call has not come yet
static uint64_t g_invoke_addr, g_cycles_addr;
static FILE* g_out;

// userdata: bit 0 says which address (1 = Invoke), the rest how many instructions of the block were
// counted ahead of this one (the block's count is added when the block starts).
static void on_marker(unsigned int vcpu, void* userdata) {
  (void)vcpu;
  const uintptr_t u = (uintptr_t)userdata;
  const uint64_t now = g_insns - (uint64_t)(u >> 1);
  if (u & 1u) {
    g_window_start = g_last_cycles;
    g_armed = true;
    return;
  }
  if (g_armed) {
    fprintf(g_out, "%" PRIu64 "\n", now - g_window_start);
    fflush(g_out);
    g_armed = false;
  }
  g_last_cycles = now;
}

static void on_translate(qemu_plugin_id_t id, struct qemu_plugin_tb* tb) {
  (void)id;
  const size_t n = qemu_plugin_tb_n_insns(tb);
  qemu_plugin_register_vcpu_tb_exec_inline(tb, QEMU_PLUGIN_INLINE_ADD_U64, &g_insns, n);
  for (size_t i = 0; i < n; ++i) {
    struct qemu_plugin_insn* insn = qemu_plugin_tb_get_insn(tb, i);
    const uint64_t pc = qemu_plugin_insn_vaddr(insn);
    const bool is_invoke = pc == g_invoke_addr;
    if (is_invoke || pc == g_cycles_addr) {
      const uintptr_t ahead = (uintptr_t)(n - i);  // this instruction and the ones after it in the block
      qemu_plugin_register_vcpu_insn_exec_cb(insn, on_marker, QEMU_PLUGIN_CB_NO_REGS,
                                             (void*)((ahead << 1) | (is_invoke ? 1u : 0u)));
    }
  }
}

static void on_qemu_exit(qemu_plugin_id_t id, void* userdata) {
  (void)id;
  (void)userdata;
  if (g_out != NULL) fclose(g_out);
  g_out = NULL;
}

EXPORT int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t* info, int argc, char** argv) {
  (void)info;
  const char* out = NULL;
  for (int i = 0; i < argc; ++i) {
    if (strncmp(argv[i], "invoke=", 7) == 0) g_invoke_addr = strtoull(argv[i] + 7, NULL, 0) & ~1ull;
    if (strncmp(argv[i], "cycles=", 7) == 0) g_cycles_addr = strtoull(argv[i] + 7, NULL, 0) & ~1ull;
    if (strncmp(argv[i], "out=", 4) == 0) out = argv[i] + 4;
  }
  if (!g_invoke_addr || !g_cycles_addr || out == NULL) {
    fprintf(stderr, "edgeq_insn_plugin: needs invoke=ADDR,cycles=ADDR,out=FILE\n");
    return 1;
  }
  g_out = fopen(out, "w");
  if (g_out == NULL) {
    fprintf(stderr, "edgeq_insn_plugin: cannot write %s\n", out);
    return 1;
  }
  qemu_plugin_register_vcpu_tb_trans_cb(id, on_translate);
  qemu_plugin_register_atexit_cb(id, on_qemu_exit, NULL);
  return 0;
}
