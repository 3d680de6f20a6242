// Emulated CUDA header (tests/cuda_emu).
#pragma once
#include "cuda_emu.h"
