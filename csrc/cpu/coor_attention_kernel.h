// Hand-written CPU kernel of coordinate attention: the interface between the op
// (csrc/cpu/coor_attention.cpp) and the per-ISA kernel bodies (csrc/cpu/coor_attention_tiles.h,
// compiled once per instruction set in csrc/cpu/coor_attention_kernel.cpp).
//
// The kernel works on raw pointers with element strides so that the detector's views
// (q, k, v are strided slices of one qkv projection) run without copies.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <tuple>

namespace coorkern {
namespace attn {

// A (B, heads, H, W, d) map, any strides.
template <typename S>
struct MapArg {
  const S* p = nullptr;
  int64_t sb = 0, sh = 0, sy = 0, sx = 0, sd = 1, height = 0, width = 0;
};

// (B, heads, N, d) tokens, any strides.
template <typename S>
struct TokArg {
  const S* p = nullptr;
  int64_t sb = 0, sh = 0, sn = 0, sd = 1;
};

// One attention operand: a map sampled at the coordinates, or tokens.
template <typename S>
struct Operand {
  bool sampled = false;
  MapArg<S> map;
  TokArg<S> tok;
};

// Coordinates in the accumulation type, contiguous (B, N, 2) (sh = 0: shared by the heads)
// or (B, heads, N, 2).
template <typename T>
struct CoordArg {
  const T* p = nullptr;
  int64_t sb = 0, sh = 0;
};

// S: the inputs' dtype (float, double, BFloat16, Half); T: accumulation (float or double).
template <typename S, typename T>
struct Problem {
  int64_t batch = 0, heads = 0, nq = 0, nk = 0, d = 0;
  T scale = 0;
  bool align = true;
  Operand<S> q, k, v;
  CoordArg<T> coords;
};

// What the backward produces before the scatter: fp32 (fp64) gradients of the sampled
// tokens, contiguous (B, heads, N, d), and delta = rowsum(dO * O), (B, heads, Nq).
template <typename S, typename T>
struct BackwardArgs {
  TokArg<S> grad_out, out;
  const T* lse = nullptr;  // (B, heads, Nq), natural log
  T* delta = nullptr;
  T* gq = nullptr;  // (B, heads, Nq, d)
  T* gk = nullptr;  // (B, heads, Nk, d)
  T* gv = nullptr;  // (B, heads, Nk, d)
};

// Which compiled variant runs: chosen once from the CPU's features, or forced with
// COORKERN_CPU_ISA=avx512|avx2|baseline (tests run every variant that the CPU supports).
enum class Isa { Baseline = 0, Avx2 = 1, Avx512 = 2 };
Isa selected_isa();
const char* isa_name(Isa isa);

// The fallback rule, per direction, from measurements on a 2-core AVX-512 Xeon
// (bench/RESULTS.md): the forward runs the kernel for d <= kMaxHeadDim (it beat ATen's
// grid sampler + flash forward at every d it covers); the backward runs the kernel for
// d <= kMaxBackwardHeadDim, where its 7-product, atomic-free backward beat ATen's 5-product
// flash backward, and ATen's composition above (it accepts the kernel's out and
// log-sum-exp).  COORKERN_CPU_ATTENTION=aten|kernel forces one path for both directions
// (tests and before/after benchmarks).
constexpr int64_t kMaxHeadDim = 128;
constexpr int64_t kMaxBackwardHeadDim = 8;
bool use_kernel(int64_t head_dim, bool backward);

std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                           const at::Tensor& coords, bool qk, double scale, bool align_corners);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& grad_out, const at::Tensor& q,
                                                                    const at::Tensor& k, const at::Tensor& v,
                                                                    const at::Tensor& coords, const at::Tensor& out,
                                                                    const at::Tensor& lse, bool qk, double scale,
                                                                    bool align_corners);

}  // namespace attn
}  // namespace coorkern
