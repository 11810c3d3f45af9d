// Central loss on CUDA tensors for C++ callers: the Triton kernel of
// coorkern/ops/central_loss.py, compiled ahead of time (AOT_VARIANTS there), launched
// like its Python host code (_triton_pass) and registered under the CUDA key.
//
// Python overrides these registrations with its JIT-compiled kernels when coorkern is
// imported (coorkern/_library.py), so they serve libtorch programs only.  float16 and
// bfloat16 inputs are computed in float32 (the AOT set holds float32/float64 kernels);
// r = 2 gets its specialized kernel, any other r the general one.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <limits>
#include <optional>
#include <string>

#include "aot/aot.h"

namespace coorkern {
namespace {

// Kernel modes (the MODE constexpr of _central_loss_kernel).
constexpr int kLossNone = 0, kLossSum = 1, kGrad = 2;
constexpr int64_t kMaxGridY = 65535;

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

at::Tensor run(int mode, const at::Tensor& logits, const Target& spec, double r, c10::string_view reduction,
               const at::Tensor* grad_output = nullptr) {
  check_reduction(reduction);
  TORCH_CHECK(r >= 0.0, "coorkern::central_loss: r must be >= 0, got ", r);
  const auto type = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto x = kernel_operand(logits, type);
  const bool from_landmarks = spec.landmarks != nullptr;
  const int64_t numel = x.numel();
  int64_t inner = numel, outer = 1, width = 1;
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
    outer = inner > 0 ? numel / inner : 0;
    data = kernel_operand(spec.landmarks->to(x.device()), type);
    t = data;  // unused pointer slot
  } else {
    TORCH_CHECK(spec.target->sizes() == logits.sizes(), "coorkern::central_loss: target must have the shape of logits ",
                logits.sizes(), ", got ", spec.target->sizes());
    t = kernel_operand(spec.target->to(x.device()), type);
    data = t;  // unused pointer slot
  }
  TORCH_CHECK(outer <= kMaxGridY, "coorkern::central_loss_from_landmarks: at most ", kMaxGridY, " heatmaps, got ", outer);
  const bool scalar_grad = reduction != "none";
  const std::string variant = std::string("dtype=") + aot::triton_dtype(type) +
                              ",from_landmarks=" + (from_landmarks ? "1" : "0") +
                              ",grad_out_scalar=" + (mode != kGrad || scalar_grad ? "1" : "0") +
                              ",mode=" + std::to_string(mode) + ",r_int=" + (r == 2.0 ? "2" : "-1");
  const int64_t block = aot::constexpr_int("central_loss", variant, "BLOCK");
  const int64_t programs = (inner + block - 1) / block;

  at::Tensor out = mode == kLossSum ? at::empty({outer, programs}, x.options()) : at::empty_like(x);
  at::Tensor g_out = x;  // unused pointer slot unless mode == kGrad
  if (mode == kGrad) {
    g_out = scalar_grad ? kernel_operand(*grad_output, type) : kernel_operand(grad_output->expand_as(x), type);
  }
  const double radius2 = spec.radius ? *spec.radius * *spec.radius : std::numeric_limits<double>::infinity();
  const double grad_scale = reduction == "mean" && numel > 0 ? 1.0 / static_cast<double>(numel) : 1.0;
  if (numel > 0) {
    aot::launch(x.device(), "central_loss", variant,
                {static_cast<uint32_t>(programs), static_cast<uint32_t>(outer), 1},
                {aot::Arg::tensor(x), aot::Arg::tensor(t), aot::Arg::tensor(data), aot::Arg::tensor(g_out),
                 aot::Arg::tensor(out), aot::Arg::i64(inner), aot::Arg::i32(static_cast<int32_t>(width)),
                 aot::Arg::f32(static_cast<float>(r)), aot::Arg::f32(static_cast<float>(0.5 / (spec.sigma * spec.sigma))),
                 aot::Arg::f32(static_cast<float>(radius2)), aot::Arg::f32(static_cast<float>(grad_scale))});
  }
  if (mode == kLossSum) {
    auto total = out.sum();
    if (reduction == "mean") total = total / static_cast<double>(numel);
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
