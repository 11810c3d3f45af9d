// Central loss: the CPU kernels of torch.ops.coorkern.central_loss* (schemas: csrc/ops/).
//
// Per element (p = sigmoid(x), t the target, w = |t-p|^r, bce the binary
// cross-entropy from log-sigmoids):  loss = w * bce,
// dloss/dx = dw/dx * bce + w * (p - t),  dw/dx = -r sign(t-p) |t-p|^(r-1) p (1-p).
// The math mirrors the Triton kernel of coorkern.ops.central_loss.
//
// Work is split into fixed "lines" (a heatmap row, or a fixed-size chunk of a flat
// tensor), each reduced to one partial sum; partials are added in order, so results
// do not depend on the number of threads.  Inside a line, blocks of kBlock elements
// are converted to float, run through a `#pragma omp simd` loop built from
// branch-free exp/log (so GCC vectorizes it), and compiled for AVX-512, AVX2+FMA and a
// baseline ISA with runtime selection (target_clones) on x86-64.  Integer r in
// [0, 4] gets its own instantiation where |t-p|^r is plain multiplication.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

// The element math must be inlined into the SIMD loops for them to vectorize.
#if defined(__GNUC__)
#define COORKERN_INLINE inline __attribute__((always_inline))
#else
#define COORKERN_INLINE inline
#endif

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define COORKERN_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define COORKERN_CLONES
#endif

namespace coorkern {
namespace {

constexpr int64_t kBlock = 1024;        // elements per SIMD block (fits L1 with its buffers)
constexpr int64_t kFlatLine = 16384;    // elements per line for the flat (target tensor) variant
constexpr int64_t kGrainElems = 32768;  // elements per parallel_for task, at least

enum class Reduction { None, Mean, Sum };

Reduction parse_reduction(c10::string_view reduction) {
  if (reduction == "none") return Reduction::None;
  if (reduction == "mean") return Reduction::Mean;
  if (reduction == "sum") return Reduction::Sum;
  TORCH_CHECK(false, "coorkern::central_loss: reduction must be 'mean', 'sum' or 'none', got '",
              std::string(reduction), "'");
}

// ---- float math: branch-free so that loops over it vectorize -----------------

COORKERN_INLINE float bits_as_float(int32_t i) {
  float f;
  std::memcpy(&f, &i, sizeof f);
  return f;
}

COORKERN_INLINE int32_t float_as_bits(float f) {
  int32_t i;
  std::memcpy(&i, &f, sizeof i);
  return i;
}

struct FastMath {
  // exp: Cody-Waite range reduction + Cephes degree-5 polynomial (~1 ulp).
  // Results below e^-87.3 (FLT_MIN) are flushed to 0; inputs above 88 saturate.
  static COORKERN_INLINE float exp(float x) {
    const bool underflow = x < -87.3f;
    x = std::min(std::max(x, -87.3f), 88.0f);
    const float k = std::floor(x * 1.44269504088896341f + 0.5f);
    const float r = x - k * 0.693359375f + k * 2.12194440e-4f;
    const float r2 = r * r;
    float y = 1.9875691500e-4f;
    y = y * r + 1.3981999507e-3f;
    y = y * r + 8.3334519073e-3f;
    y = y * r + 4.1665795894e-2f;
    y = y * r + 1.6666665459e-1f;
    y = y * r + 5.0000001201e-1f;
    y = y * r2 + r + 1.0f;
    const float scale = bits_as_float((static_cast<int32_t>(k) + 127) << 23);
    return underflow ? 0.0f : y * scale;
  }

  // log for x > 0 (finite): exponent/mantissa split + Cephes polynomial (~1 ulp).
  static COORKERN_INLINE float log(float x) {
    const bool subnormal = x < 1.17549435e-38f;
    x = subnormal ? x * 8388608.0f : x;  // 2^23
    const int32_t bits = float_as_bits(x);
    float e = static_cast<float>(((bits >> 23) & 0xff) - 126) - (subnormal ? 23.0f : 0.0f);
    float m = bits_as_float((bits & 0x007fffff) | 0x3f000000);  // [0.5, 1)
    const bool low = m < 0.707106781186547524f;
    e = low ? e - 1.0f : e;
    m = low ? m + m - 1.0f : m - 1.0f;
    const float z = m * m;
    float y = 7.0376836292e-2f;
    y = y * m - 1.1514610310e-1f;
    y = y * m + 1.1676998740e-1f;
    y = y * m - 1.2420140846e-1f;
    y = y * m + 1.4249322787e-1f;
    y = y * m - 1.6668057665e-1f;
    y = y * m + 2.0000714765e-1f;
    y = y * m - 2.4999993993e-1f;
    y = y * m + 3.3333331174e-1f;
    y = y * m * z;
    y += -2.12194440e-4f * e;
    y += -0.5f * z;
    return m + y + 0.693359375f * e;
  }
};

struct StdMath {  // float64 path: accuracy over speed (gradcheck, reference comparisons)
  static inline double exp(double x) { return std::exp(x); }
  static inline double log(double x) { return std::log(x); }
};

template <int kPow, typename T>
COORKERN_INLINE T int_pow(T a) {
  T result = T(1);  // a^0 = 1, also at a = 0: r = 0 is exactly BCE
  for (int i = 0; i < kPow; ++i) result *= a;
  return result;
}

// Loss and gradient of one element.  kPow >= 0: r is that integer and |t-p|^r is
// multiplications (r = 1, 2 are the common settings; saves 2-3 exp/log per element);
// kPow = -1: general r through exp/log.  kGrad selects whether the gradient is needed.
template <typename T, typename M, int kPow, bool kGrad>
COORKERN_INLINE T central_loss_element(T x, T t, T r, T* grad) {
  const T e = M::exp(-std::abs(x));
  const T u = T(1) + e;
  const T inv_u = T(1) / u;
  const bool positive = x >= T(0);
  const T p = positive ? inv_u : e * inv_u;  // sigmoid(x)
  const T q = positive ? e * inv_u : inv_u;  // 1 - sigmoid(x), without cancellation
  // log(1 + e): log(u) * e / (u - 1) cancels the rounding of u (Goldberg); u == 1 means e < ulp.
  const T log1p_e = u == T(1) ? e : M::log(u) * (e / (u - T(1)));
  const T log_p = std::min(x, T(0)) - log1p_e;   // log sigmoid(x)
  const T log_q = -std::max(x, T(0)) - log1p_e;  // log(1 - sigmoid(x))
  const T bce = -(t * log_p + (T(1) - t) * log_q);
  const T d = t - p;
  const T a = std::abs(d);
  T w, mag;  // w = |d|^r; mag = |d|^(r-1) p (1-p), used only where d != 0
  if constexpr (kPow >= 0) {
    w = int_pow<kPow>(a);
    mag = kPow >= 1 ? int_pow<(kPow >= 1 ? kPow - 1 : 0)>(a) * p * q : T(0);
  } else {
    const bool nonzero = d != T(0);
    const T log_a = M::log(nonzero ? a : T(1));
    w = nonzero ? M::exp(r * log_a) : T(0);
    w = r == T(0) ? T(1) : w;
    mag = M::exp((r - T(1)) * log_a + log_p + log_q);  // one exp: no overflow of |d|^(r-1) alone
  }
  if (kGrad) {
    // Plain selects (no &&): short-circuit control flow stops GCC from vectorizing.
    const T signed_r = d > T(0) ? -r : r;
    const T dw = d != T(0) ? signed_r * mag : T(0);  // d/dx |d|^r, taken as 0 at d == 0
    *grad = dw * bce + w * (p - t);
  }
  return w * bce;
}

template <typename T, typename M, int kPow>
COORKERN_INLINE double loss_block(const T* x, const T* t, int64_t n, T r, T* loss_out) {
  T acc = 0;
  T unused;
  if (loss_out != nullptr) {
#pragma omp simd reduction(+ : acc)
    for (int64_t i = 0; i < n; ++i) {
      const T l = central_loss_element<T, M, kPow, false>(x[i], t[i], r, &unused);
      loss_out[i] = l;
      acc += l;
    }
  } else {
#pragma omp simd reduction(+ : acc)
    for (int64_t i = 0; i < n; ++i) acc += central_loss_element<T, M, kPow, false>(x[i], t[i], r, &unused);
  }
  return static_cast<double>(acc);
}

template <typename T, typename M, int kPow>
COORKERN_INLINE void grad_block(const T* x, const T* t, int64_t n, T r, const T* grad_out, T grad_scale, T* grad) {
  // Two loops rather than a per-element test of grad_out: a conditional load blocks vectorization.
  if (grad_out != nullptr) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      T g;
      central_loss_element<T, M, kPow, true>(x[i], t[i], r, &g);
      grad[i] = g * grad_out[i];
    }
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      T g;
      central_loss_element<T, M, kPow, true>(x[i], t[i], r, &g);
      grad[i] = g * grad_scale;
    }
  }
}

template <typename T, typename M>
COORKERN_INLINE void gaussian_block(T* t, int64_t col0, int64_t n, T lx, T dy2, T inv_two_sigma2, T radius2) {
  // No radius is radius2 = +inf; a NaN landmark is handled by the caller.  The
  // column is built from an int32 counter: int64 -> float has no AVX2 instruction.
  const T first = static_cast<T>(col0) - lx;
  const int32_t count = static_cast<int32_t>(n);
#pragma omp simd
  for (int32_t i = 0; i < count; ++i) {
    const T dx = first + static_cast<T>(i);
    const T dist2 = dx * dx + dy2;
    const T g = M::exp(-dist2 * inv_two_sigma2);
    t[i] = dist2 > radius2 ? T(0) : g;
  }
}

// Expands CALL(kPow) with kPow = r when r is an integer in [0, 4], else kPow = -1.
// A switch in each entry point (not a lambda) so that everything is inlined into
// the target_clones copies: a lambda body would be compiled once, for the baseline ISA.
#define COORKERN_WITH_POW(r, CALL)   \
  do {                               \
    if ((r) == 0) {                  \
      CALL(0);                       \
    } else if ((r) == 1) {           \
      CALL(1);                       \
    } else if ((r) == 2) {           \
      CALL(2);                       \
    } else if ((r) == 3) {           \
      CALL(3);                       \
    } else if ((r) == 4) {           \
      CALL(4);                       \
    } else {                         \
      CALL(-1);                      \
    }                                \
  } while (0)

template <typename T, typename M>
COORKERN_INLINE double loss_block_any_pow(const T* x, const T* t, int64_t n, T r, T* out) {
  double total = 0;
#define COORKERN_LOSS_CALL(P) total = loss_block<T, M, P>(x, t, n, r, out)
  COORKERN_WITH_POW(r, COORKERN_LOSS_CALL);
#undef COORKERN_LOSS_CALL
  return total;
}

template <typename T, typename M>
COORKERN_INLINE void grad_block_any_pow(const T* x, const T* t, int64_t n, T r, const T* go, T gs, T* grad) {
#define COORKERN_GRAD_CALL(P) grad_block<T, M, P>(x, t, n, r, go, gs, grad)
  COORKERN_WITH_POW(r, COORKERN_GRAD_CALL);
#undef COORKERN_GRAD_CALL
}

// Non-template float entry points, so target_clones can build one copy per ISA
// (the templates are force-inlined into each copy).
COORKERN_CLONES double loss_block_f32(const float* x, const float* t, int64_t n, float r, float* out) {
  return loss_block_any_pow<float, FastMath>(x, t, n, r, out);
}
COORKERN_CLONES void grad_block_f32(const float* x, const float* t, int64_t n, float r, const float* go, float gs,
                                    float* grad) {
  grad_block_any_pow<float, FastMath>(x, t, n, r, go, gs, grad);
}
COORKERN_CLONES void gaussian_block_f32(float* t, int64_t col0, int64_t n, float lx, float dy2, float inv2s2,
                                        float radius2) {
  gaussian_block<float, FastMath>(t, col0, n, lx, dy2, inv2s2, radius2);
}

inline double loss_block_acc(const float* x, const float* t, int64_t n, float r, float* out) {
  return loss_block_f32(x, t, n, r, out);
}
inline double loss_block_acc(const double* x, const double* t, int64_t n, double r, double* out) {
  return loss_block_any_pow<double, StdMath>(x, t, n, r, out);
}
inline void grad_block_acc(const float* x, const float* t, int64_t n, float r, const float* go, float gs, float* g) {
  grad_block_f32(x, t, n, r, go, gs, g);
}
inline void grad_block_acc(const double* x, const double* t, int64_t n, double r, const double* go, double gs,
                           double* g) {
  grad_block_any_pow<double, StdMath>(x, t, n, r, go, gs, g);
}
inline void gaussian_block_acc(float* t, int64_t c0, int64_t n, float lx, float dy2, float s, float r2) {
  gaussian_block_f32(t, c0, n, lx, dy2, s, r2);
}
inline void gaussian_block_acc(double* t, int64_t c0, int64_t n, double lx, double dy2, double s, double r2) {
  gaussian_block<double, StdMath>(t, c0, n, lx, dy2, s, r2);
}

// ---- drivers ------------------------------------------------------------------

// Where the target comes from: a tensor, or Gaussians around landmarks.
struct TargetSpec {
  const at::Tensor* target = nullptr;   // contiguous, same dtype as logits
  const double* landmarks = nullptr;    // (planes, 2) as (x, y), float64
  int64_t height = 0, width = 0;
  double inv_two_sigma2 = 0, radius2 = std::numeric_limits<double>::infinity();
};

// Loads `n` elements of `src` at `offset` into an accumulation-type buffer, or
// points straight at them when no conversion is needed.
template <typename scalar_t, typename acc_t>
inline const acc_t* load_block(const scalar_t* src, int64_t offset, int64_t n, acc_t* buf) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return src + offset;
  } else {
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<acc_t>(src[offset + i]);
    return buf;
  }
}

// Runs `block_fn(offset, n, x, t)` over every kBlock-sized piece of every line, in
// parallel over lines; returns each line's sum of block_fn results (the partial sums).
template <typename scalar_t, typename acc_t, typename BlockFn>
std::vector<double> for_each_line(const at::Tensor& x, const TargetSpec& spec, BlockFn&& block_fn) {
  const int64_t numel = x.numel();
  const bool from_landmarks = spec.landmarks != nullptr;
  const int64_t line_len = from_landmarks ? spec.width : kFlatLine;
  const int64_t lines = line_len == 0 ? 0 : (numel + line_len - 1) / line_len;
  std::vector<double> partials(static_cast<size_t>(lines), 0.0);
  const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
  const scalar_t* t_ptr = from_landmarks ? nullptr : spec.target->const_data_ptr<scalar_t>();
  const int64_t grain = std::max<int64_t>(1, kGrainElems / std::max<int64_t>(line_len, 1));
  at::parallel_for(0, lines, grain, [&](int64_t begin, int64_t end) {
    acc_t x_buf[kBlock], t_buf[kBlock];
    for (int64_t line = begin; line < end; ++line) {
      const int64_t start = line * line_len;
      const int64_t len = std::min(line_len, numel - start);
      double total = 0;
      acc_t lx = 0, dy2 = 0;
      bool missing = false;
      if (from_landmarks) {
        const int64_t plane = line / spec.height, row = line % spec.height;
        lx = static_cast<acc_t>(spec.landmarks[2 * plane]);
        const acc_t ly = static_cast<acc_t>(spec.landmarks[2 * plane + 1]);
        missing = std::isnan(spec.landmarks[2 * plane]) || std::isnan(spec.landmarks[2 * plane + 1]);
        dy2 = (static_cast<acc_t>(row) - ly) * (static_cast<acc_t>(row) - ly);
      }
      for (int64_t b = 0; b < len; b += kBlock) {
        const int64_t n = std::min(kBlock, len - b);
        const acc_t* xs = load_block<scalar_t, acc_t>(x_ptr, start + b, n, x_buf);
        const acc_t* ts;
        if (!from_landmarks) {
          ts = load_block<scalar_t, acc_t>(t_ptr, start + b, n, t_buf);
        } else {
          if (missing) {
            std::fill(t_buf, t_buf + n, acc_t(0));
          } else {
            gaussian_block_acc(t_buf, b, n, lx, dy2, static_cast<acc_t>(spec.inv_two_sigma2),
                               static_cast<acc_t>(spec.radius2));
          }
          ts = t_buf;
        }
        total += block_fn(start + b, n, xs, ts);
      }
      partials[static_cast<size_t>(line)] = total;
    }
  });
  return partials;
}

template <typename scalar_t>
at::Tensor loss_impl(const at::Tensor& logits, const TargetSpec& spec, double r, Reduction reduction) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const at::Tensor x = logits.contiguous();
  at::Tensor loss = reduction == Reduction::None ? at::empty_like(x, at::MemoryFormat::Contiguous) : at::Tensor();
  scalar_t* loss_ptr = loss.defined() ? loss.mutable_data_ptr<scalar_t>() : nullptr;
  const acc_t r_acc = static_cast<acc_t>(r);
  auto partials = for_each_line<scalar_t, acc_t>(x, spec, [&](int64_t offset, int64_t n, const acc_t* xs,
                                                              const acc_t* ts) {
    if (loss_ptr == nullptr) return loss_block_acc(xs, ts, n, r_acc, nullptr);
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      return loss_block_acc(xs, ts, n, r_acc, loss_ptr + offset);
    } else {
      acc_t out[kBlock];
      const double s = loss_block_acc(xs, ts, n, r_acc, out);
      for (int64_t i = 0; i < n; ++i) loss_ptr[offset + i] = static_cast<scalar_t>(out[i]);
      return s;
    }
  });
  if (reduction == Reduction::None) return loss.view(logits.sizes());
  double total = 0;
  for (double p : partials) total += p;
  if (reduction == Reduction::Mean) total /= static_cast<double>(x.numel());  // 0/0 = NaN, like mean()
  return at::scalar_tensor(total, logits.options());
}

template <typename scalar_t>
at::Tensor grad_impl(const at::Tensor& grad_output, const at::Tensor& logits, const TargetSpec& spec, double r,
                     Reduction reduction) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const at::Tensor x = logits.contiguous();
  at::Tensor grad = at::empty_like(x, at::MemoryFormat::Contiguous);
  scalar_t* grad_ptr = grad.mutable_data_ptr<scalar_t>();
  const acc_t r_acc = static_cast<acc_t>(r);
  acc_t scale = 0;
  at::Tensor go;
  const scalar_t* go_ptr = nullptr;
  if (reduction == Reduction::None) {
    go = grad_output.to(logits.scalar_type()).expand_as(x).contiguous();
    go_ptr = go.const_data_ptr<scalar_t>();
  } else {
    scale = static_cast<acc_t>(grad_output.item<double>());
    if (reduction == Reduction::Mean && x.numel() > 0) scale /= static_cast<acc_t>(x.numel());
  }
  for_each_line<scalar_t, acc_t>(x, spec, [&](int64_t offset, int64_t n, const acc_t* xs, const acc_t* ts) {
    acc_t go_buf[kBlock], out[kBlock];
    const acc_t* go_acc = go_ptr != nullptr ? load_block<scalar_t, acc_t>(go_ptr, offset, n, go_buf) : nullptr;
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      grad_block_acc(xs, ts, n, r_acc, go_acc, scale, grad_ptr + offset);
    } else {
      grad_block_acc(xs, ts, n, r_acc, go_acc, scale, out);
      for (int64_t i = 0; i < n; ++i) grad_ptr[offset + i] = static_cast<scalar_t>(out[i]);
    }
    return 0.0;
  });
  return grad.view(logits.sizes());
}

void check_logits(const at::Tensor& logits, double r) {
  TORCH_CHECK(logits.device().is_cpu(), "coorkern::central_loss (CPU kernel): logits must be on the CPU");
  TORCH_CHECK(at::isFloatingType(logits.scalar_type()),
              "coorkern::central_loss: logits must be float32/float64/float16/bfloat16, got ", logits.scalar_type());
  TORCH_CHECK(r >= 0 && std::isfinite(r), "coorkern::central_loss: r must be finite and >= 0, got ", r);
}

TargetSpec target_spec(const at::Tensor& logits, const at::Tensor& target, at::Tensor& holder) {
  TORCH_CHECK(target.sizes() == logits.sizes(), "coorkern::central_loss: target must have the shape of logits ",
              logits.sizes(), ", got ", target.sizes());
  TORCH_CHECK(target.device().is_cpu(), "coorkern::central_loss: target must be on the CPU");
  holder = target.to(logits.scalar_type()).contiguous();
  TargetSpec spec;
  spec.target = &holder;
  return spec;
}

TargetSpec landmark_spec(const at::Tensor& logits, const at::Tensor& landmarks, double sigma,
                         std::optional<double> radius, at::Tensor& holder) {
  TORCH_CHECK(logits.dim() >= 3, "coorkern::central_loss_from_landmarks: logits must be (B, L, H, W), got ",
              logits.sizes());
  auto expected = logits.sizes().vec();
  expected.pop_back();
  expected.back() = 2;
  TORCH_CHECK(landmarks.sizes().vec() == expected, "coorkern::central_loss_from_landmarks: landmarks must have shape ",
              c10::IntArrayRef(expected), ", got ", landmarks.sizes());
  TORCH_CHECK(sigma > 0 && std::isfinite(sigma), "coorkern::central_loss_from_landmarks: sigma must be > 0");
  TORCH_CHECK(!radius.has_value() || *radius >= 0, "coorkern::central_loss_from_landmarks: radius must be >= 0");
  holder = landmarks.to(at::kDouble).contiguous();
  TargetSpec spec;
  spec.landmarks = holder.const_data_ptr<double>();
  spec.height = logits.size(-2);
  spec.width = logits.size(-1);
  spec.inv_two_sigma2 = 1.0 / (2.0 * sigma * sigma);
  spec.radius2 = radius.has_value() ? (*radius) * (*radius) : std::numeric_limits<double>::infinity();
  return spec;
}

#define COORKERN_DISPATCH_FLOATS(dtype, name, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, name, __VA_ARGS__)

at::Tensor central_loss_cpu(const at::Tensor& logits, const at::Tensor& target, double r, c10::string_view reduction) {
  check_logits(logits, r);
  const Reduction red = parse_reduction(reduction);
  at::Tensor holder;
  const TargetSpec spec = target_spec(logits, target, holder);
  return COORKERN_DISPATCH_FLOATS(logits.scalar_type(), "central_loss",
                                  [&] { return loss_impl<scalar_t>(logits, spec, r, red); });
}

at::Tensor central_loss_backward_cpu(const at::Tensor& grad_output, const at::Tensor& logits, const at::Tensor& target,
                                     double r, c10::string_view reduction) {
  check_logits(logits, r);
  const Reduction red = parse_reduction(reduction);
  at::Tensor holder;
  const TargetSpec spec = target_spec(logits, target, holder);
  return COORKERN_DISPATCH_FLOATS(logits.scalar_type(), "central_loss_backward",
                                  [&] { return grad_impl<scalar_t>(grad_output, logits, spec, r, red); });
}

at::Tensor central_loss_from_landmarks_cpu(const at::Tensor& logits, const at::Tensor& landmarks, double sigma,
                                           double r, c10::string_view reduction, std::optional<double> radius) {
  check_logits(logits, r);
  const Reduction red = parse_reduction(reduction);
  at::Tensor holder;
  const TargetSpec spec = landmark_spec(logits, landmarks, sigma, radius, holder);
  return COORKERN_DISPATCH_FLOATS(logits.scalar_type(), "central_loss_from_landmarks",
                                  [&] { return loss_impl<scalar_t>(logits, spec, r, red); });
}

at::Tensor central_loss_from_landmarks_backward_cpu(const at::Tensor& grad_output, const at::Tensor& logits,
                                                    const at::Tensor& landmarks, double sigma, double r,
                                                    c10::string_view reduction, std::optional<double> radius) {
  check_logits(logits, r);
  const Reduction red = parse_reduction(reduction);
  at::Tensor holder;
  const TargetSpec spec = landmark_spec(logits, landmarks, sigma, radius, holder);
  return COORKERN_DISPATCH_FLOATS(logits.scalar_type(), "central_loss_from_landmarks_backward",
                                  [&] { return grad_impl<scalar_t>(grad_output, logits, spec, r, red); });
}

}  // namespace

// The schemas are in csrc/ops/central_loss.cpp.
TORCH_LIBRARY_IMPL(coorkern, CPU, m) {
  m.impl("central_loss", &central_loss_cpu);
  m.impl("central_loss_backward", &central_loss_backward_cpu);
  m.impl("central_loss_from_landmarks", &central_loss_from_landmarks_cpu);
  m.impl("central_loss_from_landmarks_backward", &central_loss_from_landmarks_backward_cpu);
}

}  // namespace coorkern
