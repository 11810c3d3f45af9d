// Coordinate-indexed attention on CPU tensors: torch.ops.coorkern.coor_attention[_backward].
//
// Two implementations, one rule (attn::use_kernel, csrc/cpu/coor_attention_kernel.h): the
// hand-written kernel (csrc/cpu/coor_attention_kernel.cpp: sampling fused into the tile loads,
// flash softmax vectorized across tokens, per-ISA variants) runs the forward for d <= 128
// and the backward for d <= 8, where it measured faster; ATen's composition below runs the
// rest.  COORKERN_CPU_ATTENTION=aten|kernel forces either path.
//
// The ATen composition:
//   forward : grid_sampler_2d per sampled tensor -> the CPU flash attention kernel
//             (_scaled_dot_product_flash_attention_for_cpu), which also returns the
//             log-sum-exp, so nothing N x N is ever allocated;
//   backward: the flash attention backward from that log-sum-exp, then
//             grid_sampler_2d_backward scatters the sampled gradients to the maps and
//             gives the coordinate gradient (summed over heads for shared coords and
//             over the two sampled tensors).
// Half inputs are computed in float32 (CPUs have no fast half matmul and the
// coordinates need float32 precision anyway), float64 stays float64.
//
// Layouts: maps (B, heads, H, W, d) channels-last per head, tokens (B, heads, N, d),
// coords (B, N, 2) shared by the heads or (B, heads, N, 2), (x, y) normalized as in
// grid_sample.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "cpu/coor_attention_kernel.h"

#include <array>
#include <string>
#include <tuple>

namespace coorkern {
namespace {

constexpr int64_t kBilinear = 0;
constexpr int64_t kZeros = 0;

at::ScalarType compute_type(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_sample(const std::string& sample) {
  TORCH_CHECK(sample == "qk" || sample == "kv", "coor_attention: sample must be 'qk' or 'kv', got '", sample, "'");
}

// (B, heads, H, W, d) map -> (B*heads, d, H, W) in the compute dtype, as grid_sampler wants.
at::Tensor map_nchw(const at::Tensor& m, at::ScalarType ct) {
  TORCH_CHECK(m.dim() == 5, "coor_attention: maps must have shape (B, heads, H, W, d), got ", m.sizes());
  return m.to(ct).permute({0, 1, 4, 2, 3}).reshape({m.size(0) * m.size(1), m.size(4), m.size(2), m.size(3)});
}

// coords (B, N, 2) or (B, heads, N, 2) -> grid (B*heads, 1, N, 2).
at::Tensor make_grid(const at::Tensor& coords, int64_t batch, int64_t heads, at::ScalarType ct) {
  TORCH_CHECK((coords.dim() == 3 || coords.dim() == 4) && coords.size(-1) == 2,
              "coor_attention: coords must have shape (B, N, 2) or (B, heads, N, 2), got ", coords.sizes());
  auto g = coords.to(ct);
  const int64_t n = g.size(-2);
  if (g.dim() == 3) g = g.unsqueeze(1).expand({batch, heads, n, 2});
  return g.reshape({batch * heads, 1, n, 2});
}

// grid_sampler output (B*heads, d, 1, N) -> tokens (B, heads, N, d).
at::Tensor sampled_tokens(const at::Tensor& nchw, const at::Tensor& grid, bool align_corners, int64_t batch,
                          int64_t heads) {
  auto s = at::grid_sampler_2d(nchw, grid, kBilinear, kZeros, align_corners);
  return s.reshape({batch, heads, s.size(1), s.size(3)}).transpose(-1, -2).contiguous();
}

// The attention operands in the compute dtype: Qs, Ks, Vs (B, heads, N, d) tokens, plus
// what the backward needs to scatter through grid_sample again.
struct Operands {
  at::Tensor qs, ks, vs;
  at::Tensor grid;    // (B*heads, 1, N, 2)
  at::Tensor k_nchw;  // the k map as grid_sampler input
  at::Tensor s_nchw;  // the other sampled map (q for "qk", v for "kv")
  bool qk;
};

Operands sample_operands(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& coords,
                         c10::string_view sample_sv, bool align_corners) {
  const std::string sample(sample_sv);
  check_sample(sample);
  const auto ct = compute_type(q);
  const int64_t batch = q.size(0), heads = q.size(1);
  Operands o;
  o.qk = sample == "qk";
  o.grid = make_grid(coords, batch, heads, ct);
  o.k_nchw = map_nchw(k, ct);
  o.s_nchw = map_nchw(o.qk ? q : v, ct);
  o.ks = sampled_tokens(o.k_nchw, o.grid, align_corners, batch, heads);
  const auto other = sampled_tokens(o.s_nchw, o.grid, align_corners, batch, heads);
  o.qs = o.qk ? other : q.to(ct).contiguous();
  o.vs = o.qk ? v.to(ct).contiguous() : other;
  return o;
}

std::tuple<at::Tensor, at::Tensor> coor_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                      const at::Tensor& coords, c10::string_view sample,
                                                      double scale, bool align_corners) {
  check_sample(std::string(sample));
  if (attn::use_kernel(q.size(-1), false)) return attn::forward(q, k, v, coords, sample == "qk", scale, align_corners);
  const auto o = sample_operands(q, k, v, coords, sample, align_corners);
  auto res = at::_scaled_dot_product_flash_attention_for_cpu(o.qs, o.ks, o.vs, 0.0, false, c10::nullopt, scale);
  auto out = std::get<0>(res).to(q.scalar_type()).contiguous();
  auto lse = std::get<1>(res).to(compute_type(q)).contiguous();
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> coor_attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& coords, const at::Tensor& out, const at::Tensor& lse, c10::string_view sample,
    double scale, bool align_corners) {
  check_sample(std::string(sample));
  if (attn::use_kernel(q.size(-1), true)) {
    return attn::backward(grad_out, q, k, v, coords, out, lse, sample == "qk", scale, align_corners);
  }
  // Recompute the sampled tokens (O(N d), cheaper than keeping them alive since forward).
  const auto o = sample_operands(q, k, v, coords, sample, align_corners);
  const auto ct = compute_type(q);
  const int64_t batch = q.size(0), heads = q.size(1);
  const auto& grid = o.grid;
  const bool qk = o.qk;
  auto grads = at::_scaled_dot_product_flash_attention_for_cpu_backward(
      grad_out.to(ct).contiguous(), o.qs, o.ks, o.vs, out.to(ct).contiguous(), lse.to(ct).contiguous(), 0.0, false,
      c10::nullopt, scale);
  const auto& dqs = std::get<0>(grads);
  const auto& dks = std::get<1>(grads);
  const auto& dvs = std::get<2>(grads);

  // Scatter a sampled-token gradient (B, heads, N, d) back through grid_sample.
  auto scatter = [&](const at::Tensor& d_tokens, const at::Tensor& nchw, const at::Tensor& fmap) {
    const int64_t n = d_tokens.size(2), d = d_tokens.size(3);
    auto g = d_tokens.transpose(-1, -2).reshape({batch * heads, d, 1, n});
    auto res = at::grid_sampler_2d_backward(g, nchw, grid, kBilinear, kZeros, align_corners,
                                            std::array<bool, 2>{true, true});
    auto d_map = std::get<0>(res)
                     .reshape({batch, heads, d, fmap.size(2), fmap.size(3)})
                     .permute({0, 1, 3, 4, 2})
                     .to(fmap.scalar_type())
                     .contiguous();
    auto d_grid = std::get<1>(res).reshape({batch, heads, n, 2});
    return std::make_pair(d_map, d_grid);
  };
  auto [dk, dgrid_k] = scatter(dks, o.k_nchw, k);
  auto [d_other, dgrid_other] = scatter(qk ? dqs : dvs, o.s_nchw, qk ? q : v);
  auto dq = qk ? d_other : dqs.to(q.scalar_type()).contiguous();
  auto dv = qk ? dvs.to(v.scalar_type()).contiguous() : d_other;
  auto dgrid = dgrid_other + dgrid_k;
  if (coords.dim() == 3) dgrid = dgrid.sum(1);  // shared by the heads
  auto dcoords = dgrid.to(coords.scalar_type()).contiguous();
  return {dq, dk, dv, dcoords};
}

}  // namespace

// The schemas are in csrc/ops/coor_attention.cpp.
TORCH_LIBRARY_IMPL(coorkern, CPU, m) {
  m.impl("coor_attention", &coor_attention_cpu);
  m.impl("coor_attention_backward", &coor_attention_backward_cpu);
}

}  // namespace coorkern
