# board.cmake: QEMU's mps2-an386 (Cortex-M4F) for edgeq's generic CMake project (-DEDGEQ_BOARD_DIR=<this folder>).
# deploy/device/qemu.py builds the same sources with the same flags, compiling only what the firmware links.
set(EDGEQ_BOARD_SOURCES
  "${EDGEQ_BOARD_DIR}/startup_mps2_an386.c"
  "${EDGEQ_BOARD_DIR}/platform_mps2_an386.cc")
set(EDGEQ_BOARD_COMPILE_OPTIONS -mcpu=cortex-m4 -mthumb -mfloat-abi=hard -mfpu=fpv4-sp-d16 -fno-unwind-tables)
set(EDGEQ_BOARD_LINK_OPTIONS
  -mcpu=cortex-m4 -mthumb -mfloat-abi=hard -mfpu=fpv4-sp-d16
  -nostartfiles "-T${EDGEQ_BOARD_DIR}/mps2_an386.ld" -Wl,--gc-sections -Wl,--no-warn-rwx-segments)
