// Looks up and launches the ahead-of-time compiled Triton kernels (see aot.h).  The CUDA
// driver comes from dlopen("libcuda.so.1"); cuda.h (shipped with Triton) is only read
// for its types.  The stream is torch's current CUDA stream, obtained through c10's
// device-guard registry, so this file needs no CUDA runtime or c10_cuda at link time.
#include "cuda/aot.h"

#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <c10/util/Exception.h>
#include <cuda.h>
#include <dlfcn.h>

#include <map>
#include <mutex>
#include <sstream>
#include <utility>

namespace coorkern {
namespace aot {
namespace {

struct Driver {
  decltype(&::cuInit) init;
  decltype(&::cuGetErrorString) error_string;
  decltype(&::cuDeviceGet) device_get;
  decltype(&::cuDeviceGetAttribute) device_attribute;
  decltype(&::cuCtxGetCurrent) ctx_get_current;
  decltype(&::cuCtxSetCurrent) ctx_set_current;
  decltype(&::cuDevicePrimaryCtxRetain) primary_ctx_retain;
  decltype(&::cuModuleLoadData) module_load_data;
  decltype(&::cuModuleGetFunction) module_get_function;
  decltype(&::cuFuncSetAttribute) func_set_attribute;
  decltype(&::cuLaunchKernel) launch_kernel;
};

void check(const Driver& d, CUresult result, const char* what) {
  if (result == CUDA_SUCCESS) return;
  const char* message = nullptr;
  d.error_string(result, &message);
  TORCH_CHECK(false, "coorkern: CUDA driver call ", what, " failed: ", message ? message : "unknown error");
}

const Driver& driver() {
  static const Driver d = [] {
    void* handle = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    TORCH_CHECK(handle != nullptr, "coorkern: cannot load the CUDA driver libcuda.so.1 (", dlerror(), ")");
    auto symbol = [handle](const char* name) {
      void* p = dlsym(handle, name);
      TORCH_CHECK(p != nullptr, "coorkern: libcuda.so.1 has no ", name);
      return p;
    };
    Driver r;
    r.init = reinterpret_cast<decltype(r.init)>(symbol("cuInit"));
    r.error_string = reinterpret_cast<decltype(r.error_string)>(symbol("cuGetErrorString"));
    r.device_get = reinterpret_cast<decltype(r.device_get)>(symbol("cuDeviceGet"));
    r.device_attribute = reinterpret_cast<decltype(r.device_attribute)>(symbol("cuDeviceGetAttribute"));
    r.ctx_get_current = reinterpret_cast<decltype(r.ctx_get_current)>(symbol("cuCtxGetCurrent"));
    r.ctx_set_current = reinterpret_cast<decltype(r.ctx_set_current)>(symbol("cuCtxSetCurrent"));
    r.primary_ctx_retain = reinterpret_cast<decltype(r.primary_ctx_retain)>(symbol("cuDevicePrimaryCtxRetain"));
    r.module_load_data = reinterpret_cast<decltype(r.module_load_data)>(symbol("cuModuleLoadData"));
    r.module_get_function = reinterpret_cast<decltype(r.module_get_function)>(symbol("cuModuleGetFunction"));
    r.func_set_attribute = reinterpret_cast<decltype(r.func_set_attribute)>(symbol("cuFuncSetAttribute"));
    r.launch_kernel = reinterpret_cast<decltype(r.launch_kernel)>(symbol("cuLaunchKernel"));
    check(r, r.init(0), "cuInit");
    return r;
  }();
  return d;
}

std::vector<const KernelImage*> images_of(const char* op, const std::string& variant) {
  std::vector<const KernelImage*> found;
  for (size_t i = 0; i < kNumKernels; ++i) {
    if (variant == kKernels[i].variant && std::string(op) == kKernels[i].op) found.push_back(&kKernels[i]);
  }
  TORCH_CHECK(!found.empty(), "coorkern: no ahead-of-time CUDA kernel for ", op, " variant '", variant,
              "' (coorkern.ops._aot.codegen.AOT_OPS names the module that declares its AOT_VARIANTS)");
  return found;
}

// The cubin of the highest arch <= the GPU's within its major version, else PTX to JIT.
std::pair<const KernelImage*, bool> select_image(const std::vector<const KernelImage*>& images, int capability) {
  const KernelImage* cubin = nullptr;
  const KernelImage* ptx = nullptr;
  std::string archs;
  for (const KernelImage* image : images) {
    archs += " sm_" + std::to_string(image->arch);
    if (image->arch > capability) continue;
    if (image->arch / 10 == capability / 10 && (cubin == nullptr || image->arch > cubin->arch)) cubin = image;
    if (image->ptx != nullptr && (ptx == nullptr || image->arch > ptx->arch)) ptx = image;
  }
  if (cubin != nullptr) return {cubin, false};
  TORCH_CHECK(ptx != nullptr, "coorkern: the ahead-of-time CUDA kernels were built for", archs,
              ", which cannot run on this sm_", capability, " GPU");
  return {ptx, true};
}

CUfunction load_function(const Driver& d, const KernelImage& image, bool use_ptx, CUdevice device) {
  static std::mutex mutex;
  static std::map<std::pair<CUcontext, const KernelImage*>, CUfunction> cache;
  CUcontext context = nullptr;
  check(d, d.ctx_get_current(&context), "cuCtxGetCurrent");
  if (context == nullptr) {  // torch has not touched this device from this thread yet
    check(d, d.primary_ctx_retain(&context, device), "cuDevicePrimaryCtxRetain");
    check(d, d.ctx_set_current(context), "cuCtxSetCurrent");
  }
  std::lock_guard<std::mutex> lock(mutex);
  auto it = cache.find({context, &image});
  if (it != cache.end()) return it->second;
  CUmodule module = nullptr;
  check(d, d.module_load_data(&module, use_ptx ? static_cast<const void*>(image.ptx) : image.cubin),
        "cuModuleLoadData");
  CUfunction function = nullptr;
  check(d, d.module_get_function(&function, module, image.name), "cuModuleGetFunction");
  if (image.shared > 49152) {
    check(d, d.func_set_attribute(function, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, image.shared),
          "cuFuncSetAttribute");
  }
  cache.emplace(std::make_pair(context, &image), function);
  return function;
}

int capability_of(const Driver& d, CUdevice device) {
  int major = 0, minor = 0;
  check(d, d.device_attribute(&major, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, device), "cuDeviceGetAttribute");
  check(d, d.device_attribute(&minor, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, device), "cuDeviceGetAttribute");
  return 10 * major + minor;
}

int64_t constexpr_value(const KernelImage& image, const char* name) {
  const std::string constexprs = std::string(",") + image.constexprs + ",";
  const std::string key = std::string(",") + name + "=";
  const auto at = constexprs.find(key);
  TORCH_CHECK(at != std::string::npos, "coorkern: kernel ", image.op, " has no constexpr ", name);
  return std::stoll(constexprs.substr(at + key.size()));
}

}  // namespace

std::string describe() {
  std::map<std::string, int> counts;
  for (size_t i = 0; i < kNumKernels; ++i) {
    counts[std::string(kKernels[i].op) + "@sm_" + std::to_string(kKernels[i].arch)] += 1;
  }
  std::string s;
  for (const auto& [key, count] : counts) s += (s.empty() ? "" : ",") + key + "x" + std::to_string(count);
  return s;
}

Arg Arg::tensor(const at::Tensor& t) {
  Arg a{std::string("*") + triton_dtype(t.scalar_type()), {}};
  a.value.ptr = reinterpret_cast<uint64_t>(t.data_ptr());
  return a;
}
Arg Arg::unused_pointer(const at::Tensor& t, const char* type) {
  Arg a{type, {}};
  a.value.ptr = reinterpret_cast<uint64_t>(t.data_ptr());
  return a;
}
Arg Arg::i32(int32_t v) { Arg a{"i32", {}}; a.value.i32 = v; return a; }
Arg Arg::i64(int64_t v) { Arg a{"i64", {}}; a.value.i64 = v; return a; }
Arg Arg::f32(float v) { Arg a{"fp32", {}}; a.value.f32 = v; return a; }
Arg Arg::f64(double v) { Arg a{"fp64", {}}; a.value.f64 = v; return a; }

const char* triton_dtype(at::ScalarType type) {
  switch (type) {
    case at::kFloat: return "fp32";
    case at::kDouble: return "fp64";
    case at::kHalf: return "fp16";
    case at::kBFloat16: return "bf16";
    case at::kInt: return "i32";
    case at::kLong: return "i64";
    default: TORCH_CHECK(false, "coorkern: no Triton type for ", type);
  }
}

int64_t constexpr_int(const char* op, const std::string& variant, const char* name) {
  return constexpr_value(*images_of(op, variant).front(), name);
}

int64_t constexpr_int(const char* op, const std::string& variant, const char* name, const at::Device& device) {
  const auto images = images_of(op, variant);
  if (!device.is_cuda()) return constexpr_value(*images.front(), name);
  const Driver& d = driver();
  CUdevice cu_device = 0;
  check(d, d.device_get(&cu_device, device.index()), "cuDeviceGet");
  return constexpr_value(*select_image(images, capability_of(d, cu_device)).first, name);
}

void check_args(const KernelImage& image, const std::vector<Arg>& args) {
  std::string passed;
  for (const Arg& a : args) passed += (passed.empty() ? "" : ",") + a.type;
  TORCH_CHECK(passed == image.params, "coorkern: the ahead-of-time kernel ", image.op, " (", image.variant,
              ") takes (", image.params, ") but its C++ launcher passes (", passed,
              "): update csrc/cuda/ to the kernel's signature");
}

void check_launch(const char* op, const std::string& variant, const std::vector<Arg>& args) {
  check_args(*images_of(op, variant).front(), args);
  for (const Arg& a : args) {
    TORCH_CHECK(a.type[0] != '*' || a.value.ptr % 16 == 0, "coorkern: ", op, ": pointer arguments must be 16-byte aligned");
  }
}

void launch(const at::Device& device, const char* op, const std::string& variant, std::array<uint32_t, 3> grid,
            const std::vector<Arg>& args) {
  // Checked before the device, so that a call with CPU tensors (python_tests, no GPU)
  // validates the variant and the arguments of every launch.
  check_launch(op, variant, args);
  const auto images = images_of(op, variant);
  TORCH_CHECK(device.is_cuda(), "coorkern: ahead-of-time CUDA kernels need CUDA tensors, got ", device);
  if (grid[0] == 0 || grid[1] == 0 || grid[2] == 0) return;
  const Driver& d = driver();
  c10::DeviceGuard guard(device);  // makes the device's primary context current (torch's runtime)
  CUdevice cu_device = 0;
  check(d, d.device_get(&cu_device, device.index()), "cuDeviceGet");
  const auto [image, use_ptx] = select_image(images, capability_of(d, cu_device));
  CUfunction function = load_function(d, *image, use_ptx, cu_device);

  std::vector<void*> params;
  params.reserve(args.size() + 2);
  for (const Arg& a : args) params.push_back(const_cast<void*>(static_cast<const void*>(&a.value)));
  CUdeviceptr global_scratch = 0, profile_scratch = 0;  // Triton's trailing scratch parameters (unused: size 0)
  params.push_back(&global_scratch);
  params.push_back(&profile_scratch);

  const c10::Stream stream = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->getStream(device);
  check(d,
        d.launch_kernel(function, grid[0], grid[1], grid[2], 32 * image->num_warps, 1, 1, image->shared,
                        static_cast<CUstream>(stream.native_handle()), params.data(), nullptr),
        "cuLaunchKernel");
}

}  // namespace aot
}  // namespace coorkern

// The i-th compiled kernel image, for inspection (python_tests/cpp/test_cpp_aot.py
// checks each cubin's arch with cuobjdump); returns 0 past the end.
extern "C" __attribute__((visibility("default"))) int coorkern_aot_kernel(size_t i, const char** op, const char** variant,
                                                                         int* arch, const unsigned char** cubin,
                                                                         size_t* cubin_size) {
  if (i >= coorkern::aot::kNumKernels) return 0;
  const auto& image = coorkern::aot::kKernels[i];
  *op = image.op;
  *variant = image.variant;
  *arch = image.arch;
  *cubin = image.cubin;
  *cubin_size = image.cubin_size;
  return 1;
}
