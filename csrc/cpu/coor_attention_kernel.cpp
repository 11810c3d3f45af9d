// Hand-written CPU kernel of coordinate attention (see csrc/cpu/coor_attention_kernel.h):
// compiles the kernel bodies of csrc/cpu/coor_attention_tiles.h once per instruction set
// (AVX-512 with 16-lane vectors, AVX2+FMA, the x86-64 / any-CPU baseline) and picks
// one at run time from the CPU's features; turns tensors into the kernel's pointer views;
// and scatters the sampled tokens' gradients back to the maps.
//
// Determinism: every task (batch, head, block of tokens) reads shared inputs and writes
// only its own rows; the scatter to a map runs one task per (batch, head) in token order;
// the coordinate gradient is summed over the two sampled maps and the heads in a fixed
// order.  Results are therefore independent of the thread count, with no atomics.
#include "cpu/coor_attention_kernel.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define COORKERN_X86_VARIANTS 1
#endif

#define CK_INLINE inline __attribute__((always_inline))

// The kernel passes 32-byte vectors only between force-inlined functions of one variant.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace coorkern {
namespace attn {

// The baseline variant: 32-byte vectors split into SSE2 halves, one register row.
namespace baseline {
#define COORKERN_VEC_BYTES 32
#define COORKERN_TILE_ROWS 1
#include "cpu/coor_attention_tiles.h"
#undef COORKERN_TILE_ROWS
#undef COORKERN_VEC_BYTES
}  // namespace baseline

#ifdef COORKERN_X86_VARIANTS
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,bmi,bmi2,popcnt")
namespace avx2 {  // 16 ymm registers: 2 x 4 accumulators
#define COORKERN_VEC_BYTES 32
#define COORKERN_TILE_ROWS 2
#include "cpu/coor_attention_tiles.h"
#undef COORKERN_TILE_ROWS
#undef COORKERN_VEC_BYTES
}  // namespace avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c,bmi,bmi2,popcnt")
namespace avx512 {  // 32 zmm registers: 4 x 4 accumulators
#define COORKERN_VEC_BYTES 64
#define COORKERN_TILE_ROWS 4
#include "cpu/coor_attention_tiles.h"
#undef COORKERN_TILE_ROWS
#undef COORKERN_VEC_BYTES
}  // namespace avx512
#pragma GCC pop_options
#endif

namespace {

Isa detect_isa() {
#ifdef COORKERN_X86_VARIANTS
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq")) {
    return Isa::Avx512;
  }
  if (avx2) return Isa::Avx2;
#endif
  return Isa::Baseline;
}

std::string env(const char* name) {
  const char* value = std::getenv(name);
  return value == nullptr ? std::string() : std::string(value);
}

}  // namespace

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Avx512: return "avx512";
    case Isa::Avx2: return "avx2";
    default: return "baseline";
  }
}

Isa selected_isa() {
  static const Isa best = detect_isa();
  const std::string forced = env("COORKERN_CPU_ISA");
  if (forced.empty()) return best;
  Isa want = Isa::Avx512;
  if (forced == "avx2") {
    want = Isa::Avx2;
  } else if (forced == "baseline") {
    want = Isa::Baseline;
  } else {
    TORCH_CHECK(forced == "avx512", "COORKERN_CPU_ISA must be avx512, avx2 or baseline, got '", forced, "'");
  }
  return static_cast<int>(want) < static_cast<int>(best) ? want : best;  // never above what the CPU has
}

bool use_kernel(int64_t head_dim, bool backward) {
  const std::string forced = env("COORKERN_CPU_ATTENTION");
  if (forced == "aten") return false;
  if (forced == "kernel") return true;
  TORCH_CHECK(forced.empty() || forced == "auto", "COORKERN_CPU_ATTENTION must be auto, kernel or aten, got '",
              forced, "'");
  return head_dim <= (backward ? kMaxBackwardHeadDim : kMaxHeadDim);
}

namespace {

at::ScalarType acc_type(const at::Tensor& t) { return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

template <typename S>
MapArg<S> map_arg(const at::Tensor& t) {  // (B, heads, H, W, d)
  return {t.const_data_ptr<S>(), t.stride(0), t.stride(1), t.stride(2), t.stride(3), t.stride(4), t.size(2), t.size(3)};
}

template <typename S>
TokArg<S> tok_arg(const at::Tensor& t) {  // (B, heads, N, d)
  return {t.const_data_ptr<S>(), t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

template <typename S>
Operand<S> operand(const at::Tensor& t, bool sampled) {
  Operand<S> o;
  o.sampled = sampled;
  if (sampled) {
    o.map = map_arg<S>(t);
  } else {
    o.tok = tok_arg<S>(t);
  }
  return o;
}

void check_shapes(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& coords, bool qk) {
  TORCH_CHECK(q.dim() == (qk ? 5 : 4) && k.dim() == 5 && v.dim() == (qk ? 4 : 5),
              "coor_attention: expected maps (B, heads, H, W, d) and tokens (B, heads, N, d), got q ", q.sizes(),
              ", k ", k.sizes(), ", v ", v.sizes());
  TORCH_CHECK((coords.dim() == 3 || coords.dim() == 4) && coords.size(-1) == 2,
              "coor_attention: coords must have shape (B, N, 2) or (B, heads, N, 2), got ", coords.sizes());
  const int64_t batch = q.size(0), heads = q.size(1), d = q.size(-1), n = coords.size(-2);
  for (const auto* t : {&k, &v}) {
    TORCH_CHECK(t->size(0) == batch && t->size(1) == heads && t->size(-1) == d,
                "coor_attention: q, k, v must agree in batch, heads and d");
  }
  TORCH_CHECK(coords.size(0) == batch && (coords.dim() == 3 || coords.size(1) == heads),
              "coor_attention: coords must have shape (B, N, 2) or (B, heads, N, 2), got ", coords.sizes());
  TORCH_CHECK(!qk || v.size(2) == n, "coor_attention: v must hold one token per coordinate");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "coor_attention: q, k and v must share a dtype");
}

template <typename S, typename T>
Problem<S, T> make_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& co,
                           bool qk, double scale, bool align) {
  Problem<S, T> P;
  P.batch = q.size(0);
  P.heads = q.size(1);
  P.d = q.size(-1);
  P.nk = co.size(-2);
  P.nq = qk ? P.nk : q.size(2);
  P.scale = static_cast<T>(scale);
  P.align = align;
  P.q = operand<S>(q, qk);
  P.k = operand<S>(k, true);
  P.v = operand<S>(v, !qk);
  P.coords.p = co.const_data_ptr<T>();
  P.coords.sh = co.dim() == 4 ? 2 * P.nk : 0;
  P.coords.sb = co.dim() == 4 ? P.heads * 2 * P.nk : 2 * P.nk;
  return P;
}

#ifdef COORKERN_X86_VARIANTS
#define COORKERN_ON_ISA(...)                   \
  switch (selected_isa()) {                    \
    case Isa::Avx512: avx512::__VA_ARGS__; break; \
    case Isa::Avx2: avx2::__VA_ARGS__; break;     \
    default: baseline::__VA_ARGS__; break;        \
  }
#else
#define COORKERN_ON_ISA(...) baseline::__VA_ARGS__
#endif

#define COORKERN_DISPATCH_INPUTS(dtype, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "coor_attention_cpu", __VA_ARGS__)

template <typename S>
using acc_of = std::conditional_t<std::is_same_v<S, double>, double, float>;

// Adds the sampled tokens' gradient g (B, heads, n, d) into dmap (contiguous (B, heads, H, W, d))
// through the bilinear weights, and writes each token's coordinate gradient (sum over d)
// to dcoord (B, heads, n, 2).  One task per (batch, head), tokens in order.
template <typename S, typename T>
void scatter(const MapArg<S>& m, const CoordArg<T>& co, bool align, int64_t batch, int64_t heads, int64_t n,
             int64_t d, const T* g, T* dmap, T* dcoord) {
  const T gx_scale = align ? T(m.width - 1) / 2 : T(m.width) / 2;
  const T gy_scale = align ? T(m.height - 1) / 2 : T(m.height) / 2;
  at::parallel_for(0, batch * heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / heads, h = bh % heads;
      const S* base = m.p + b * m.sb + h * m.sh;
      T* dm = dmap + bh * m.height * m.width * d;
      for (int64_t i = 0; i < n; ++i) {
        const baseline::Stencil<T> st = baseline::stencil(co.p + b * co.sb + h * co.sh + 2 * i, m.height, m.width, align);
        const T* gi = g + (bh * n + i) * d;
        T* dc = dcoord + (bh * n + i) * 2;
        if (st.nan) {  // grid_sample: no gradient reaches the map from a NaN coordinate
          dc[0] = dc[1] = std::numeric_limits<T>::quiet_NaN();
          continue;
        }
        T gx = 0, gy = 0;
        baseline::for_each_corner(st, m.height, m.width, [&](int64_t y, int64_t x, int dy, int dx, T wy, T wx) {
          const S* px = base + y * m.sy + x * m.sx;
          T* dpx = dm + (y * m.width + x) * d;
          T dot = 0;
          for (int64_t c = 0; c < d; ++c) {
            dpx[c] += wx * wy * gi[c];
            dot += gi[c] * static_cast<T>(px[c * m.sd]);
          }
          gx += (dx ? wy : -wy) * dot;
          gy += (dy ? wx : -wx) * dot;
        });
        dc[0] = gx * gx_scale;
        dc[1] = gy * gy_scale;
      }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                           const at::Tensor& coords, bool qk, double scale, bool align_corners) {
  check_shapes(q, k, v, coords, qk);
  const auto acc = acc_type(q);
  const auto co = coords.to(acc).contiguous();
  const int64_t nq = qk ? coords.size(-2) : q.size(2);
  auto out = at::empty({q.size(0), q.size(1), nq, q.size(-1)}, q.options());
  auto lse = at::empty({q.size(0), q.size(1), nq}, q.options().dtype(acc));
  if (out.numel() == 0) return {out, lse};
  COORKERN_DISPATCH_INPUTS(q.scalar_type(), [&] {
    using T = acc_of<scalar_t>;
    const auto P = make_problem<scalar_t, T>(q, k, v, co, qk, scale, align_corners);
    scalar_t* out_p = out.mutable_data_ptr<scalar_t>();
    T* lse_p = lse.mutable_data_ptr<T>();
    COORKERN_ON_ISA(forward_impl<scalar_t, T>(P, out_p, lse_p));
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& grad_out, const at::Tensor& q,
                                                                    const at::Tensor& k, const at::Tensor& v,
                                                                    const at::Tensor& coords, const at::Tensor& out,
                                                                    const at::Tensor& lse, bool qk, double scale,
                                                                    bool align_corners) {
  check_shapes(q, k, v, coords, qk);
  const auto acc = acc_type(q);
  const auto co = coords.to(acc).contiguous();
  const int64_t batch = q.size(0), heads = q.size(1), d = q.size(-1), nk = coords.size(-2);
  const int64_t nq = qk ? nk : q.size(2);
  TORCH_CHECK(grad_out.sizes() == out.sizes() && out.sizes() == at::IntArrayRef({batch, heads, nq, d}),
              "coor_attention_backward: grad_out and out must have shape (B, heads, Nq, d)");
  const auto fopts = q.options().dtype(acc);
  const auto lse_c = lse.to(acc).contiguous();
  auto delta = at::empty({batch, heads, nq}, fopts);
  auto gq = at::empty({batch, heads, nq, d}, fopts);
  auto gk = at::empty({batch, heads, nk, d}, fopts);
  auto gv = at::empty({batch, heads, nk, d}, fopts);
  const auto go = grad_out.to(q.scalar_type());
  const auto o = out.to(q.scalar_type());
  auto dq = at::zeros_like(q, fopts, at::MemoryFormat::Contiguous);
  auto dk = at::zeros_like(k, fopts, at::MemoryFormat::Contiguous);
  auto dv = at::zeros_like(v, fopts, at::MemoryFormat::Contiguous);
  auto dgrid_k = at::empty({batch, heads, nk, 2}, fopts);
  auto dgrid_other = at::empty({batch, heads, nk, 2}, fopts);
  COORKERN_DISPATCH_INPUTS(q.scalar_type(), [&] {
    using T = acc_of<scalar_t>;
    const auto P = make_problem<scalar_t, T>(q, k, v, co, qk, scale, align_corners);
    BackwardArgs<scalar_t, T> A;
    A.grad_out = tok_arg<scalar_t>(go);
    A.out = tok_arg<scalar_t>(o);
    A.lse = lse_c.const_data_ptr<T>();
    A.delta = delta.mutable_data_ptr<T>();
    A.gq = gq.mutable_data_ptr<T>();
    A.gk = gk.mutable_data_ptr<T>();
    A.gv = gv.mutable_data_ptr<T>();
    COORKERN_ON_ISA(backward_impl<scalar_t, T>(P, A));
    // Sampled operands: scatter to the map; token operands: the token gradient is it.
    scatter(P.k.map, P.coords, align_corners, batch, heads, nk, d, A.gk, dk.mutable_data_ptr<T>(),
            dgrid_k.mutable_data_ptr<T>());
    const auto& other = qk ? P.q.map : P.v.map;
    scatter(other, P.coords, align_corners, batch, heads, nk, d, qk ? A.gq : A.gv,
            (qk ? dq : dv).mutable_data_ptr<T>(), dgrid_other.mutable_data_ptr<T>());
  });
  if (qk) {
    dv = gv;
  } else {
    dq = gq;
  }
  // Coordinate gradient: the other map's + the k map's, then (shared coords) the heads' in order.
  auto dcoords = at::empty(co.sizes(), fopts);
  AT_DISPATCH_FLOATING_TYPES(acc, "coor_attention_cpu_dcoords", [&] {
    const scalar_t* a = dgrid_other.const_data_ptr<scalar_t>();
    const scalar_t* b = dgrid_k.const_data_ptr<scalar_t>();
    scalar_t* out_p = dcoords.mutable_data_ptr<scalar_t>();
    const bool shared = co.dim() == 3;
    const int64_t row = 2 * nk;
    for (int64_t bi = 0; bi < batch; ++bi) {
      for (int64_t h = 0; h < heads; ++h) {
        const int64_t src = (bi * heads + h) * row;
        scalar_t* dst = out_p + (shared ? bi : bi * heads + h) * row;
        for (int64_t i = 0; i < row; ++i) {
          const scalar_t value = a[src + i] + b[src + i];
          dst[i] = (shared && h > 0) ? dst[i] + value : value;
        }
      }
    }
  });
  auto cast = [](const at::Tensor& t, const at::Tensor& like) { return t.to(like.scalar_type()).contiguous(); };
  return {cast(dq, q), cast(dk, k), cast(dv, v), cast(dcoords, coords)};
}

}  // namespace attn
}  // namespace coorkern
