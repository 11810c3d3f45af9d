// Coordinate attention: the op schemas (torch.ops.coorkern.coor_attention[_backward]) and
// the typed C++ entry points of <coorkern/ops.h>.  The kernels register themselves per
// device: csrc/cpu/ (C++), csrc/cuda/ (Triton compiled ahead of time), and Python's
// Triton JIT kernels.
#include <coorkern/ops.h>
#include <torch/library.h>

#include <cmath>

#include "ops/lookup.h"

// Schemas: keep identical to SCHEMAS of coorkern.ops.coor_attention (tested).
TORCH_LIBRARY_FRAGMENT(coorkern, m) {
  m.def(
      "coor_attention(Tensor q, Tensor k, Tensor v, Tensor coords, str sample, float scale, bool align_corners) "
      "-> (Tensor, Tensor)");
  m.def(
      "coor_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor coords, Tensor out, "
      "Tensor lse, str sample, float scale, bool align_corners) -> (Tensor, Tensor, Tensor, Tensor)");
}

namespace coorkern {
namespace {

// The schemas take the scale; the C++ API, like Python's, defaults it to d^-1/2.
double resolve_scale(const at::Tensor& q, std::optional<double> scale) {
  return scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(q.size(-1)));
}

using AttentionFn = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                       const at::Tensor&, c10::string_view, double, bool);
using AttentionBackwardFn = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, const at::Tensor&, c10::string_view, double, bool);

}  // namespace

std::tuple<at::Tensor, at::Tensor> coor_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                  const at::Tensor& coords, c10::string_view sample,
                                                  std::optional<double> scale, bool align_corners) {
  static const auto op = ops::lookup<AttentionFn>("coorkern::coor_attention");
  return op.call(q, k, v, coords, sample, resolve_scale(q, scale), align_corners);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> coor_attention_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& coords, const at::Tensor& out, const at::Tensor& lse, c10::string_view sample,
    std::optional<double> scale, bool align_corners) {
  static const auto op = ops::lookup<AttentionBackwardFn>("coorkern::coor_attention_backward");
  return op.call(grad_out, q, k, v, coords, out, lse, sample, resolve_scale(q, scale), align_corners);
}

}  // namespace coorkern
