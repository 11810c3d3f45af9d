// Triton kernels compiled ahead of time (coorkern.ops._aot.codegen) and their launch through
// the CUDA driver API.  libcuda is opened with dlopen at the first launch, so nothing
// links against it and the library loads on machines without a GPU.  Only compiled when
// setup.py generated the kernels (COORKERN_WITH_AOT_CUDA).
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace coorkern {
namespace aot {

// One compiled variant of one kernel for one arch (the generated table kKernels).
struct KernelImage {
  const char* op;          // e.g. "central_loss"
  const char* variant;     // "k=v,..." sorted: the aot_spec arguments (coorkern.ops.*.AOT_VARIANTS)
  const char* constexprs;  // "NAME=value,..." sorted: the kernel's constexpr values
  int arch;                // 80 -> sm_80
  const char* name;        // kernel symbol in the cubin
  const unsigned char* cubin;
  size_t cubin_size;
  const char* ptx;  // NUL-terminated PTX for driver JIT on newer GPUs, or nullptr
  int shared;       // bytes of dynamic shared memory
  int num_warps;
  const char* params;  // Triton types of the runtime parameters, in order: "*fp32,i64,fp32,..."
};

extern const KernelImage kKernels[];
extern const size_t kNumKernels;

// "<op>@sm_<arch>x<count>,...": what the table holds (coorkern_build_info()).
std::string describe();

// A launch argument: a tensor's data pointer or a scalar, with its Triton type.
struct Arg {
  std::string type;
  union {
    uint64_t ptr;
    int32_t i32;
    int64_t i64;
    float f32;
    double f64;
  } value;

  static Arg tensor(const at::Tensor& t);
  // A pointer slot of another type that the kernel does not read in this variant (e.g. the
  // deterministic scatter's index buffer), filled with t's address.
  static Arg unused_pointer(const at::Tensor& t, const char* type);
  static Arg i32(int32_t v);
  static Arg i64(int64_t v);
  static Arg f32(float v);
  static Arg f64(double v);
};

// Triton's name for a tensor dtype ("fp32", "fp64", ...).
const char* triton_dtype(at::ScalarType type);

// The integer constexpr `name` of a variant (e.g. its BLOCK), for the launch grid.
int64_t constexpr_int(const char* op, const std::string& variant, const char* name);
// The same for the image that launch() runs on `device` (block sizes may differ per arch);
// the first image for a non-CUDA device (the tests' CPU-tensor calls).
int64_t constexpr_int(const char* op, const std::string& variant, const char* name, const at::Device& device);

// Checks args against the variant's parameter types; throws naming both when they differ.
void check_args(const KernelImage& image, const std::vector<Arg>& args);

// check_args for the variant, and 16-byte aligned pointers; throws otherwise.  launch()
// does this first; a launcher calls it itself for a later launch it must not start
// without (and so that CPU-tensor calls in the tests validate that launch too).
void check_launch(const char* op, const std::string& variant, const std::vector<Arg>& args);

// Launches the variant on the current stream of `device`, choosing the cubin for the
// GPU's arch (or JIT-compiling PTX for newer GPUs).  Pointers must be 16-byte aligned.
void launch(const at::Device& device, const char* op, const std::string& variant, std::array<uint32_t, 3> grid,
            const std::vector<Arg>& args);

}  // namespace aot
}  // namespace coorkern
