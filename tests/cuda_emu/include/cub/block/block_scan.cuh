// Emulated cub header (tests/cuda_emu).
#pragma once
#include "cuda_emu_cub.h"
