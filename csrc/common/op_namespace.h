// The namespace this binary registers the ops' kernels in: simclr_ext, or simclr_ext_emu in the test build of
// the emulated CUDA kernels (tests/cuda_emu/, -DSIMCLR_EXT_OP_NAMESPACE=simclr_ext_emu), whose ops have the
// same schemas and the same C++ autograd.
#pragma once

#ifndef SIMCLR_EXT_OP_NAMESPACE
#define SIMCLR_EXT_OP_NAMESPACE simclr_ext
#endif
#define SIMCLR_EXT_OP_STR_(x) #x
#define SIMCLR_EXT_OP_STR(x) SIMCLR_EXT_OP_STR_(x)
// "simclr_ext::name" (or "simclr_ext_emu::name"): an op's qualified name for the dispatcher.
#define SIMCLR_EXT_OP_NAME(name) SIMCLR_EXT_OP_STR(SIMCLR_EXT_OP_NAMESPACE) "::" name
