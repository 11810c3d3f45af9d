// Central loss on CUDA tensors for C++ callers: the Triton kernels of
// coorkern.ops.central_loss, compiled ahead of time (its AOT_VARIANTS), launched
// exactly like its Python host code (_triton_pass): the same arguments (fp64 scalars), a
// 1-D grid of rows x chunks_per_row programs of CHUNK elements, and for mean/sum the same
// finishing kernel over the partial sums.  Registered under the CUDA key.
//
// Python overrides these registrations with its JIT-compiled kernels when coorkern is
// imported (coorkern.ops._runtime.library), so they serve libtorch programs only.  What the AOT set
// fixes at build time (see AOT_VARIANTS): one launch configuration (no autotuning),
// float32/float64 kernels (float16/bfloat16 inputs are computed in float32, with the one
// rounding to the input dtype at the end, as Python's in-kernel casts do), r = 2
// specialized and any other r through the general kernel.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <optional>
#include <string>

#include "cuda/aot.h"

namespace coorkern {
namespace {

constexpr const char* kOp = "central_loss";
// Kernel modes (the MODE constexpr of _central_loss_kernel).
constexpr int kLossNone = 0, kLossSum = 1, kGrad = 2;
// FAST_ROW_PIXELS of coorkern.ops.central_loss (a test checks they agree): below it the landmark
// kernel's float32 row/column split is exact.
constexpr int64_t kFastRowPixels = int64_t{1} << 22;
constexpr int64_t kMaxGridX = (int64_t{1} << 31) - 1;

void check_reduction(c10::string_view reduction) {
  TORCH_CHECK(reduction == "mean" || reduction == "sum" || reduction == "none",
              "coorkern::central_loss: reduction must be 'mean', 'sum' or 'none', got '", std::string(reduction), "'");
}

// Contiguous, in the compute dtype, 16-byte aligned (the kernels are compiled for that).
at::Tensor kernel_operand(const at::Tensor& t, at::ScalarType type) {
  auto c = t.to(type).contiguous();
  return reinterpret_cast<uintptr_t>(c.data_ptr()) % 16 == 0 ? c : c.clone();
}

struct Target {
  const at::Tensor* target = nullptr;     // the target tensor, or
  const at::Tensor* landmarks = nullptr;  // landmarks (*, 2) for in-kernel Gaussians
  double sigma = 1.0;
  std::optional<double> radius;
};

// The AOT_VARIANTS keys (coorkern.ops._aot.codegen.variant_key: sorted "key=value").
std::string pass_variant(at::ScalarType type, bool from_landmarks, bool fast_row, bool grad_out_scalar, int mode,
                         int r_int) {
  return std::string("dtype=") + aot::triton_dtype(type) + ",fast_row=" + (fast_row ? "1" : "0") +
         ",from_landmarks=" + (from_landmarks ? "1" : "0") + ",grad_out_scalar=" + (grad_out_scalar ? "1" : "0") +
         ",kernel=central_loss,mode=" + std::to_string(mode) + ",r_int=" + std::to_string(r_int);
}

std::string finish_variant(at::ScalarType type) {
  return std::string("dtype=") + aot::triton_dtype(type) + ",kernel=finish_sum";
}

at::Tensor run(int mode, const at::Tensor& logits, const Target& spec, double r, c10::string_view reduction,
               const at::Tensor* grad_output = nullptr) {
  check_reduction(reduction);
  TORCH_CHECK(r >= 0.0, "coorkern::central_loss: r must be >= 0, got ", r);
  const auto type = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto x = kernel_operand(logits, type);
  const bool from_landmarks = spec.landmarks != nullptr;
  const int64_t numel = x.numel();
  int64_t inner = numel, rows = 1, width = 1;
  at::Tensor t, data;
  if (from_landmarks) {
    TORCH_CHECK(logits.dim() >= 3 && spec.landmarks->dim() == logits.dim() - 1 &&
                    spec.landmarks->sizes().slice(0, logits.dim() - 2) == logits.sizes().slice(0, logits.dim() - 2) &&
                    spec.landmarks->size(-1) == 2,
                "coorkern::central_loss_from_landmarks: landmarks must have shape (*, 2) for logits (*, H, W), got ",
                spec.landmarks->sizes(), " for ", logits.sizes());
    TORCH_CHECK(spec.sigma > 0.0, "coorkern::central_loss_from_landmarks: sigma must be > 0, got ", spec.sigma);
    width = x.size(-1);
    inner = x.size(-2) * width;
    TORCH_CHECK(inner < (int64_t{1} << 31), "coorkern::central_loss_from_landmarks: heatmaps must have < 2^31 pixels");
    rows = inner > 0 ? numel / inner : 0;
    data = kernel_operand(spec.landmarks->to(x.device()), type);
    t = data;  // unused pointer slot
  } else {
    TORCH_CHECK(spec.target->sizes() == logits.sizes(), "coorkern::central_loss: target must have the shape of logits ",
                logits.sizes(), ", got ", spec.target->sizes());
    t = kernel_operand(spec.target->to(x.device()), type);
    data = t;  // unused pointer slot
  }
  const bool scalar_grad = reduction != "none";
  // FAST_ROW only changes the landmark kernels; the target ones are compiled with it on.
  const bool fast_row = !from_landmarks || inner < kFastRowPixels;
  const std::string variant = pass_variant(type, from_landmarks, fast_row, mode != kGrad || scalar_grad, mode,
                                           r == 2.0 ? 2 : -1);
  const int64_t chunk = aot::constexpr_int(kOp, variant, "CHUNK");
  const int64_t chunks_per_row = (inner + chunk - 1) / chunk;
  const int64_t programs = rows * chunks_per_row;
  TORCH_CHECK(programs <= kMaxGridX, "coorkern::central_loss: ", numel, " elements need ", programs,
              " programs, more than a CUDA grid holds (", kMaxGridX, ")");

  at::Tensor out = mode == kLossSum ? at::empty({std::max<int64_t>(programs, 1)}, x.options()) : at::empty_like(x);
  at::Tensor g_out = x;  // unused pointer slot unless mode == kGrad
  if (mode == kGrad) {
    g_out = scalar_grad ? kernel_operand(*grad_output, type) : kernel_operand(grad_output->expand_as(x), type);
  }
  // The finishing launch of mean/sum: _finish_sum_kernel is in the AOT set rather than an
  // ATen sum, so the partial sums are added in Python's fixed order (the same bits from
  // C++ and Python) in one launch with the division, instead of ATen's reduction order
  // and a separate divide.  Checked before the pass is launched.
  at::Tensor total;
  std::vector<aot::Arg> finish_args;
  if (mode == kLossSum) {
    total = at::empty({}, x.options());
    const double divisor = reduction == "mean" ? static_cast<double>(numel) : 1.0;
    finish_args = {aot::Arg::tensor(out), aot::Arg::tensor(total), aot::Arg::i32(static_cast<int32_t>(programs)),
                   aot::Arg::f64(divisor)};
    aot::check_launch(kOp, finish_variant(type), finish_args);
  }
  if (programs > 0) {
    // No radius: HAS_RADIUS with radius2 = inf (one variant, the same values).
    const double radius2 = spec.radius ? *spec.radius * *spec.radius : std::numeric_limits<double>::infinity();
    const double grad_scale = reduction == "mean" ? 1.0 / static_cast<double>(numel) : 1.0;
    aot::launch(x.device(), kOp, variant, {static_cast<uint32_t>(programs), 1, 1},
                {aot::Arg::tensor(x), aot::Arg::tensor(t), aot::Arg::tensor(data), aot::Arg::tensor(g_out),
                 aot::Arg::tensor(out), aot::Arg::i64(inner), aot::Arg::i32(static_cast<int32_t>(chunks_per_row)),
                 aot::Arg::i32(static_cast<int32_t>(width)), aot::Arg::f64(r),
                 aot::Arg::f64(1.0 / (2.0 * spec.sigma * spec.sigma)), aot::Arg::f64(radius2),
                 aot::Arg::f64(grad_scale)});
  }
  if (mode == kLossSum) {
    aot::launch(x.device(), kOp, finish_variant(type), {1, 1, 1}, finish_args);
    return total.to(logits.scalar_type());
  }
  return out.view(logits.sizes()).to(logits.scalar_type());
}

int loss_mode(c10::string_view reduction) { return reduction == "none" ? kLossNone : kLossSum; }

at::Tensor central_loss_cuda(const at::Tensor& logits, const at::Tensor& target, double r, c10::string_view reduction) {
  Target spec;
  spec.target = &target;
  return run(loss_mode(reduction), logits, spec, r, reduction);
}

at::Tensor central_loss_backward_cuda(const at::Tensor& grad_output, const at::Tensor& logits,
                                      const at::Tensor& target, double r, c10::string_view reduction) {
  Target spec;
  spec.target = &target;
  return run(kGrad, logits, spec, r, reduction, &grad_output);
}

Target landmark_target(const at::Tensor& landmarks, double sigma, std::optional<double> radius) {
  Target spec;
  spec.landmarks = &landmarks;
  spec.sigma = sigma;
  spec.radius = radius;
  return spec;
}

at::Tensor central_loss_from_landmarks_cuda(const at::Tensor& logits, const at::Tensor& landmarks, double sigma,
                                            double r, c10::string_view reduction, std::optional<double> radius) {
  return run(loss_mode(reduction), logits, landmark_target(landmarks, sigma, radius), r, reduction);
}

at::Tensor central_loss_from_landmarks_backward_cuda(const at::Tensor& grad_output, const at::Tensor& logits,
                                                     const at::Tensor& landmarks, double sigma, double r,
                                                     c10::string_view reduction, std::optional<double> radius) {
  return run(kGrad, logits, landmark_target(landmarks, sigma, radius), r, reduction, &grad_output);
}

}  // namespace
}  // namespace coorkern

TORCH_LIBRARY_IMPL(coorkern, CUDA, m) {
  m.impl("central_loss", &coorkern::central_loss_cuda);
  m.impl("central_loss_backward", &coorkern::central_loss_backward_cuda);
  m.impl("central_loss_from_landmarks", &coorkern::central_loss_from_landmarks_cuda);
  m.impl("central_loss_from_landmarks_backward", &coorkern::central_loss_from_landmarks_backward_cuda);
}
