// The typed C++ entry points of coorkern/include/coorkern/ops.h: each looks its op up
// once in the dispatcher and calls it, so the kernel for the tensors' device runs.
#include <ATen/core/dispatch/Dispatcher.h>
#include <coorkern/ops.h>

#include <cmath>

namespace coorkern {
namespace {

template <typename Signature>
c10::TypedOperatorHandle<Signature> lookup(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

double resolve_scale(const at::Tensor& q, std::optional<double> scale) {
  return scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(q.size(-1)));
}

using LossFn = at::Tensor(const at::Tensor&, const at::Tensor&, double, c10::string_view);
using LossBackwardFn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, double, c10::string_view);
using LandmarksFn = at::Tensor(const at::Tensor&, const at::Tensor&, double, double, c10::string_view,
                               std::optional<double>);
using LandmarksBackwardFn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, double, double,
                                       c10::string_view, std::optional<double>);
using AttentionFn = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                       const at::Tensor&, c10::string_view, double, bool);
using AttentionBackwardFn = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, const at::Tensor&, c10::string_view, double, bool);

}  // namespace

at::Tensor central_loss(const at::Tensor& logits, const at::Tensor& target, double r, c10::string_view reduction) {
  static const auto op = lookup<LossFn>("coorkern::central_loss");
  return op.call(logits, target, r, reduction);
}

at::Tensor central_loss_backward(const at::Tensor& grad_output, const at::Tensor& logits, const at::Tensor& target,
                                 double r, c10::string_view reduction) {
  static const auto op = lookup<LossBackwardFn>("coorkern::central_loss_backward");
  return op.call(grad_output, logits, target, r, reduction);
}

at::Tensor central_loss_from_landmarks(const at::Tensor& logits, const at::Tensor& landmarks, double sigma, double r,
                                       c10::string_view reduction, std::optional<double> radius) {
  static const auto op = lookup<LandmarksFn>("coorkern::central_loss_from_landmarks");
  return op.call(logits, landmarks, sigma, r, reduction, radius);
}

at::Tensor central_loss_from_landmarks_backward(const at::Tensor& grad_output, const at::Tensor& logits,
                                                const at::Tensor& landmarks, double sigma, double r,
                                                c10::string_view reduction, std::optional<double> radius) {
  static const auto op = lookup<LandmarksBackwardFn>("coorkern::central_loss_from_landmarks_backward");
  return op.call(grad_output, logits, landmarks, sigma, r, reduction, radius);
}

std::tuple<at::Tensor, at::Tensor> coor_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                  const at::Tensor& coords, c10::string_view sample,
                                                  std::optional<double> scale, bool align_corners) {
  static const auto op = lookup<AttentionFn>("coorkern::coor_attention");
  return op.call(q, k, v, coords, sample, resolve_scale(q, scale), align_corners);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> coor_attention_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& coords, const at::Tensor& out, const at::Tensor& lse, c10::string_view sample,
    std::optional<double> scale, bool align_corners) {
  static const auto op = lookup<AttentionBackwardFn>("coorkern::coor_attention_backward");
  return op.call(grad_out, q, k, v, coords, out, lse, sample, resolve_scale(q, scale), align_corners);
}

}  // namespace coorkern
