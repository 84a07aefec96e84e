// Stand-in for the CUDA header of this name when tests/emulator compiles csrc/ for the CPU.
#pragma once
#include "emu/emu.h"
#ifndef CUDART_VERSION
#define CUDART_VERSION 13000  // what the emulated kernels were written against
#endif
