// Stand-in for the CUDA header of this name when tests/emulator compiles csrc/ kernels for the CPU.
#pragma once
#include "emu/emu.h"
