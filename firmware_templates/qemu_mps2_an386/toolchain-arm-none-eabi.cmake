# toolchain-arm-none-eabi.cmake: arm-none-eabi-gcc (Debian: gcc-arm-none-eabi, libnewlib-arm-none-eabi)
# for a bare-metal Cortex-M build of edgeq's generic CMake project, e.g. for QEMU's mps2-an386:
#   cmake -S firmware -B build-qemu -DTFLM_ROOT=/path/to/cortex-m4-cmsis-nn \
#     -DCMAKE_TOOLCHAIN_FILE=<this folder>/toolchain-arm-none-eabi.cmake -DEDGEQ_BOARD_DIR=<this folder>
# The CPU flags come from the board folder's board.cmake.
set(CMAKE_SYSTEM_NAME Generic)
set(CMAKE_SYSTEM_PROCESSOR arm)
set(CMAKE_C_COMPILER arm-none-eabi-gcc)
set(CMAKE_CXX_COMPILER arm-none-eabi-g++)
set(CMAKE_ASM_COMPILER arm-none-eabi-gcc)
set(CMAKE_AR arm-none-eabi-ar)
set(CMAKE_RANLIB arm-none-eabi-ranlib)
set(CMAKE_SIZE arm-none-eabi-size)
# No OS to run a test executable on: CMake's compiler checks build a static library instead.
set(CMAKE_TRY_COMPILE_TARGET_TYPE STATIC_LIBRARY)
set(CMAKE_C_FLAGS_INIT "-ffunction-sections -fdata-sections")
set(CMAKE_CXX_FLAGS_INIT "-ffunction-sections -fdata-sections")
set(CMAKE_EXE_LINKER_FLAGS_INIT "--specs=nano.specs --specs=nosys.specs -Wl,--gc-sections")
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
