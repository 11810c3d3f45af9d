// Central loss: the op schemas (torch.ops.coorkern.central_loss*) and the typed C++ entry
// points of <coorkern/ops.h>.  The kernels register themselves per device: csrc/cpu/
// (C++), csrc/cuda/ (Triton compiled ahead of time), and Python's Triton JIT kernels.
#include <coorkern/ops.h>
#include <torch/library.h>

#include "ops/lookup.h"

// Schemas: keep identical to SCHEMAS of coorkern.ops.central_loss (tested).
TORCH_LIBRARY_FRAGMENT(coorkern, m) {
  m.def("central_loss(Tensor logits, Tensor target, float r, str reduction) -> Tensor");
  m.def("central_loss_backward(Tensor grad_output, Tensor logits, Tensor target, float r, str reduction) -> Tensor");
  m.def(
      "central_loss_from_landmarks(Tensor logits, Tensor landmarks, float sigma, float r, str reduction, "
      "float? radius) -> Tensor");
  m.def(
      "central_loss_from_landmarks_backward(Tensor grad_output, Tensor logits, Tensor landmarks, float sigma, "
      "float r, str reduction, float? radius) -> Tensor");
}

namespace coorkern {
namespace {

using LossFn = at::Tensor(const at::Tensor&, const at::Tensor&, double, c10::string_view);
using LossBackwardFn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, double, c10::string_view);
using LandmarksFn = at::Tensor(const at::Tensor&, const at::Tensor&, double, double, c10::string_view,
                               std::optional<double>);
using LandmarksBackwardFn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, double, double,
                                       c10::string_view, std::optional<double>);

}  // namespace

at::Tensor central_loss(const at::Tensor& logits, const at::Tensor& target, double r, c10::string_view reduction) {
  static const auto op = ops::lookup<LossFn>("coorkern::central_loss");
  return op.call(logits, target, r, reduction);
}

at::Tensor central_loss_backward(const at::Tensor& grad_output, const at::Tensor& logits, const at::Tensor& target,
                                 double r, c10::string_view reduction) {
  static const auto op = ops::lookup<LossBackwardFn>("coorkern::central_loss_backward");
  return op.call(grad_output, logits, target, r, reduction);
}

at::Tensor central_loss_from_landmarks(const at::Tensor& logits, const at::Tensor& landmarks, double sigma, double r,
                                       c10::string_view reduction, std::optional<double> radius) {
  static const auto op = ops::lookup<LandmarksFn>("coorkern::central_loss_from_landmarks");
  return op.call(logits, landmarks, sigma, r, reduction, radius);
}

at::Tensor central_loss_from_landmarks_backward(const at::Tensor& grad_output, const at::Tensor& logits,
                                                const at::Tensor& landmarks, double sigma, double r,
                                                c10::string_view reduction, std::optional<double> radius) {
  static const auto op = ops::lookup<LandmarksBackwardFn>("coorkern::central_loss_from_landmarks_backward");
  return op.call(grad_output, logits, landmarks, sigma, r, reduction, radius);
}

}  // namespace coorkern
