// Coordinate-attention CPU kernel bodies, ISA-neutral.  csrc/cpu/coor_attention_kernel.cpp
// includes this file once per instruction set, inside a namespace and a
// `#pragma GCC target` region (so there is deliberately no include guard), with
// COORKERN_VEC_BYTES set to its vector width and COORKERN_TILE_ROWS to the register-tile
// height its register file holds.
//
// Layout: the block a task owns lies along the vector lanes ("lanes" = 4 vectors:
// 64 fp32 tokens with AVX-512, 32 with AVX2), the other side streams through in blocks of kRows rows.
//   forward, dQ : owns queries,  streams keys   (S^T = K Q^T, O^T += V^T P^T)
//   dK/dV       : owns keys,     streams queries (S = Q K^T, dV^T += dO^T P, ...)
// so every softmax statistic (running max, sum, lse, delta) is per lane and every
// reduction is vertical: no horizontal sums, and 8 or 16 scores per instruction at any d.
// All products are the same register-tiled micro-kernel C[r][lanes] (+)= sum_k A(r, k) B[k][lanes]
// (A broadcast, B a vector row) with a COORKERN_TILE_ROWS x 4-vector accumulator tile.
// Bilinear sampling happens in the tile loads; a task owns kGroups lane blocks so that a
// streamed tile is sampled once per kOwned owned tokens.

constexpr int kVecs = 4;         // vectors per lane block
constexpr int64_t kRows = 64;    // streamed rows per block
constexpr int kTileRows = COORKERN_TILE_ROWS;

template <typename T>
struct Lanes;
template <>
struct Lanes<float> {
  typedef float vec __attribute__((vector_size(COORKERN_VEC_BYTES)));
  typedef float uvec __attribute__((vector_size(COORKERN_VEC_BYTES), aligned(4), may_alias));
  typedef int32_t ivec __attribute__((vector_size(COORKERN_VEC_BYTES)));
  static constexpr int W = COORKERN_VEC_BYTES / 4;
};
template <>
struct Lanes<double> {
  typedef double vec __attribute__((vector_size(COORKERN_VEC_BYTES)));
  typedef double uvec __attribute__((vector_size(COORKERN_VEC_BYTES), aligned(8), may_alias));
  static constexpr int W = COORKERN_VEC_BYTES / 8;
};

template <typename T>
constexpr int64_t kLanes = kVecs * Lanes<T>::W;
// Lane blocks per task: they share each streamed tile, so that a sampled row is built
// once per kOwned owned tokens (at 256, building the tiles took a quarter of the time at
// d = 16; at 1024 the per-task state stays within L2 up to d = 64).
constexpr int64_t kOwned = 1024;
template <typename T>
constexpr int64_t kGroups = kLanes<T> >= kOwned ? 1 : kOwned / kLanes<T>;

template <typename T>
CK_INLINE typename Lanes<T>::vec vload(const T* p) {
  return *reinterpret_cast<const typename Lanes<T>::uvec*>(p);
}
template <typename T>
CK_INLINE void vstore(T* p, typename Lanes<T>::vec v) {
  *reinterpret_cast<typename Lanes<T>::uvec*>(p) = v;
}
template <typename T>
CK_INLINE typename Lanes<T>::vec vsplat(T x) {
  return typename Lanes<T>::vec{} + x;
}

// Softmax units: fp32 works in base 2 (the scale carries log2 e; exp2 is a shift plus a
// polynomial), fp64 in natural units with the libm exp (oracle-exact gradcheck).
template <typename T>
struct Units;
template <>
struct Units<float> {
  using vec = Lanes<float>::vec;
  using ivec = Lanes<float>::ivec;
  static constexpr float kPerNat = 1.4426950408889634f;
  // 2^x: round-to-nearest split x = k + f (|f| <= 1/2) through the 1.5 * 2^23 shifter, Cephes
  // exp2f polynomial for 2^f (~1 ulp), 2^k built in the exponent field.  x <= -127 gives
  // exactly 0 (exp of -inf: masked or first-block rescale), NaN stays NaN; x < 128.
  static CK_INLINE vec exp(vec x) {
    const vec lo = vsplat(-127.0f);
    x = x < lo ? lo : x;  // no upper clamp: softmax exponents are <= 0 (+ rounding)
    const vec shifter = vsplat(12582912.0f);
    const vec t = x + shifter;
    const vec k = t - shifter;
    const vec f = x - k;
    vec p = vsplat(1.535336188319500e-4f);
    p = p * f + 1.339887440266574e-3f;
    p = p * f + 9.618437357674640e-3f;
    p = p * f + 5.550332471162809e-2f;
    p = p * f + 2.402264791363012e-1f;
    p = p * f + 6.931472028550421e-1f;
    p = p * f + 1.0f;
    const ivec bits = (((ivec)t - 0x4B400000) + 127) << 23;
    return p * (vec)bits;
  }
  static float log(float x) { return std::log2(x); }
};
template <>
struct Units<double> {
  using vec = Lanes<double>::vec;
  static constexpr double kPerNat = 1.0;
  static CK_INLINE vec exp(vec x) {
    for (int i = 0; i < Lanes<double>::W; ++i) x[i] = std::exp(x[i]);
    return x;
  }
  static double log(double x) { return std::log(x); }
};

// ---- the micro-kernel -----------------------------------------------------------
// C[r][lanes] (+)= sum_k A[r * ars + k * aks] * B[k][lanes] for R rows; KC > 0: K known at
// compile time (the head dimension), fully unrolled.
template <typename T, int R, bool kAcc, int KC>
CK_INLINE void gemm_tile(T* __restrict C, const T* __restrict A, int64_t ars, int64_t aks, const T* __restrict B,
                         int64_t K) {
  using vec = typename Lanes<T>::vec;
  constexpr int W = Lanes<T>::W;
  constexpr int64_t L = kLanes<T>;
  vec acc[R][kVecs];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < kVecs; ++v) acc[r][v] = kAcc ? vload(C + r * L + v * W) : vec{};
  const int64_t kk = KC > 0 ? KC : K;
#pragma GCC unroll 8
  for (int64_t k = 0; k < kk; ++k) {
    vec b[kVecs];
#pragma GCC unroll 4
    for (int v = 0; v < kVecs; ++v) b[v] = vload(B + k * L + v * W);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const T a = A[r * ars + k * aks];
#pragma GCC unroll 4
      for (int v = 0; v < kVecs; ++v) acc[r][v] += a * b[v];
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < kVecs; ++v) vstore(C + r * L + v * W, acc[r][v]);
}

template <typename T, bool kAcc, int KC>
CK_INLINE void gemm(T* C, int64_t M, const T* A, int64_t ars, int64_t aks, const T* B, int64_t K) {
  constexpr int64_t L = kLanes<T>;
  int64_t r = 0;
  for (; r + kTileRows <= M; r += kTileRows) gemm_tile<T, kTileRows, kAcc, KC>(C + r * L, A + r * ars, ars, aks, B, K);
  for (; r < M; ++r) gemm_tile<T, 1, kAcc, KC>(C + r * L, A + r * ars, ars, aks, B, K);
}

// ---- tile loads: bilinear sampling (grid_sample, zeros padding) or token rows ----------

template <typename T>
struct Stencil {
  int64_t x0 = 0, y0 = 0;
  T wx1 = 0, wy1 = 0;
  bool nan = false;
};

// grid_sample's unnormalization; the source index is clamped to [-2, size + 1] so that
// far-away coordinates (legal; they sample zeros) cannot overflow the corner index.
template <typename T>
CK_INLINE Stencil<T> stencil(const T* xy, int64_t height, int64_t width, bool align) {
  const T wf = static_cast<T>(width), hf = static_cast<T>(height);
  T ix = align ? (xy[0] + 1) / 2 * (wf - 1) : ((xy[0] + 1) * wf - 1) / 2;
  T iy = align ? (xy[1] + 1) / 2 * (hf - 1) : ((xy[1] + 1) * hf - 1) / 2;
  Stencil<T> s;
  if (std::isnan(ix) || std::isnan(iy)) {
    s.nan = true;
    return s;
  }
  ix = std::min(std::max(ix, T(-2)), wf + 1);
  iy = std::min(std::max(iy, T(-2)), hf + 1);
  const T x0 = std::floor(ix), y0 = std::floor(iy);
  s.x0 = static_cast<int64_t>(x0);
  s.y0 = static_cast<int64_t>(y0);
  s.wx1 = ix - x0;
  s.wy1 = iy - y0;
  return s;
}

// fn(y, x, dy, dx, wy, wx) for the stencil's corners inside the map (zero padding).
template <typename T, typename Fn>
CK_INLINE void for_each_corner(const Stencil<T>& st, int64_t height, int64_t width, const Fn& fn) {
  for (int dy = 0; dy < 2; ++dy) {
    const int64_t y = st.y0 + dy;
    if (y < 0 || y >= height) continue;
    const T wy = dy ? st.wy1 : 1 - st.wy1;
    for (int dx = 0; dx < 2; ++dx) {
      const int64_t x = st.x0 + dx;
      if (x < 0 || x >= width) continue;
      fn(y, x, dy, dx, wy, dx ? st.wx1 : 1 - st.wx1);
    }
  }
}

template <int D, typename S, typename T>
CK_INLINE void axpy_row(T* __restrict out, const S* __restrict p, int64_t sd, T w, int64_t d_) {
  const int64_t d = D > 0 ? D : d_;
  if (sd == 1) {
    for (int64_t c = 0; c < d; ++c) out[c] += w * static_cast<T>(p[c]);
  } else {
    for (int64_t c = 0; c < d; ++c) out[c] += w * static_cast<T>(p[c * sd]);
  }
}

// out[0:d] = mul * bilinear(map of (b, h), stencil); NaN coordinates give NaN (grid_sample).
template <int D, typename S, typename T>
CK_INLINE void sample_row(const MapArg<S>& m, const S* base, const Stencil<T>& st, T mul, int64_t d, T* out) {
  if (st.nan) {
    std::fill(out, out + d, std::numeric_limits<T>::quiet_NaN());
    return;
  }
  std::fill(out, out + d, T(0));
  for_each_corner(st, m.height, m.width, [&](int64_t y, int64_t x, int dy, int dx, T wy, T wx) {
    axpy_row<D>(out, base + y * m.sy + x * m.sx, m.sd, wx * wy * mul, d);
  });
}

// Rows [r0, r0 + n) of operand `op` of (b, h), times `mul`, into out[r * rs + c * cs].
template <int D, typename S, typename T>
void load_rows(const Operand<S>& op, const CoordArg<T>& co, bool align, int64_t b, int64_t h, int64_t r0, int64_t n,
               int64_t d_, T mul, T* out, int64_t rs, int64_t cs, T* scratch) {
  const int64_t d = D > 0 ? D : d_;
  if (op.sampled) {
    const MapArg<S>& m = op.map;
    const S* base = m.p + b * m.sb + h * m.sh;
    const T* xy = co.p + b * co.sb + h * co.sh + 2 * r0;
    for (int64_t r = 0; r < n; ++r) {
      const Stencil<T> st = stencil(xy + 2 * r, m.height, m.width, align);
      if (cs == 1) {
        sample_row<D>(m, base, st, mul, d, out + r * rs);
      } else {
        sample_row<D>(m, base, st, mul, d, scratch);
        for (int64_t c = 0; c < d; ++c) out[r * rs + c * cs] = scratch[c];
      }
    }
  } else {
    const TokArg<S>& t = op.tok;
    const S* base = t.p + b * t.sb + h * t.sh + r0 * t.sn;
    for (int64_t r = 0; r < n; ++r) {
      const S* row = base + r * t.sn;
      T* o = out + r * rs;
      if (t.sd == 1 && cs == 1) {
        for (int64_t c = 0; c < d; ++c) o[c] = mul * static_cast<T>(row[c]);
      } else {
        for (int64_t c = 0; c < d; ++c) o[c * cs] = mul * static_cast<T>(row[c * t.sd]);
      }
    }
  }
}

// Per-lane copies of per-row values (lse, delta) of the owned block, padded with 0.
template <typename T>
void load_lane_values(const T* src, int64_t n, T* dst) {
  std::fill(dst, dst + kLanes<T>, T(0));
  std::copy(src, src + n, dst);
}

// Per-thread scratch: `count` arrays of `size` elements each.
// Per-task scratch: `count` arrays of `size` elements each, uninitialized (every array is
// written before it is read).
template <typename T>
struct Scratch {
  std::unique_ptr<T[]> buf;
  int64_t size;
  Scratch(int64_t count, int64_t size_) : buf(new T[static_cast<size_t>(count * size_ + 16)]), size(size_) {}
  T* operator[](int64_t i) { return buf.get() + i * size; }
};

// ---- forward ---------------------------------------------------------------------

// Queries [q0, q0 + kGroups<T> * lanes) of (b, h): out (contiguous, input dtype) and lse.
template <typename S, typename T, int D>
void forward_task(const Problem<S, T>& P, int64_t b, int64_t h, int64_t q0, S* out, T* lse) {
  using vec = typename Lanes<T>::vec;
  constexpr int W = Lanes<T>::W;
  constexpr int64_t L = kLanes<T>;
  const int64_t d = D > 0 ? D : P.d;
  const int64_t groups = std::min(kGroups<T>, (P.nq - q0 + L - 1) / L);
  // per group: Qt, Ot (d x L); shared: K, V (kRows x d), S^T (kRows x L), row scratch
  Scratch<T> ws(2 * kGroups<T> + 4, std::max(d * L, kRows * std::max<int64_t>(d, L)));
  T* kb = ws[2 * kGroups<T>];
  T* vb = ws[2 * kGroups<T> + 1];
  T* st = ws[2 * kGroups<T> + 2];
  T* row = ws[2 * kGroups<T> + 3];
  vec m[kGroups<T>][kVecs], l[kGroups<T>][kVecs];
  const T qmul = P.scale * Units<T>::kPerNat;
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t g0 = q0 + g * L, n = std::min(L, P.nq - g0);
    std::fill(ws[g], ws[g] + d * L, T(0));
    std::fill(ws[kGroups<T> + g], ws[kGroups<T> + g] + d * L, T(0));
    load_rows<D>(P.q, P.coords, P.align, b, h, g0, n, d, qmul, ws[g], 1, L, row);
    for (int v = 0; v < kVecs; ++v) {
      m[g][v] = vsplat<T>(-std::numeric_limits<T>::infinity());
      l[g][v] = vec{};
    }
  }
  for (int64_t k0 = 0; k0 < P.nk; k0 += kRows) {
    const int64_t nb = std::min(kRows, P.nk - k0);
    load_rows<D>(P.k, P.coords, P.align, b, h, k0, nb, d, T(1), kb, d, 1, row);
    load_rows<D>(P.v, P.coords, P.align, b, h, k0, nb, d, T(1), vb, d, 1, row);
    for (int64_t g = 0; g < groups; ++g) {
      T* ot = ws[kGroups<T> + g];
      gemm<T, false, D>(st, nb, kb, d, 1, ws[g], d);  // S^T = K Q^T
      // Running max, then P^T = exp(S^T - max) and its sum; tokens outer so that the
      // kVecs lanes' max/sum chains run side by side.  A NaN score is skipped by the max
      // (the comparison is false) and poisons the sum instead, so NaN reaches the output.
      vec mx[kVecs], sum[kVecs], alpha[kVecs];
      for (int v = 0; v < kVecs; ++v) mx[v] = m[g][v];
      for (int64_t j = 0; j < nb; ++j) {
        for (int v = 0; v < kVecs; ++v) {
          const vec s = vload(st + j * L + v * W);
          mx[v] = s > mx[v] ? s : mx[v];
        }
      }
      for (int v = 0; v < kVecs; ++v) {
        alpha[v] = Units<T>::exp(m[g][v] - mx[v]);
        sum[v] = vec{};
      }
      for (int64_t j = 0; j < nb; ++j) {
        for (int v = 0; v < kVecs; ++v) {
          const vec p = Units<T>::exp(vload(st + j * L + v * W) - mx[v]);
          vstore(st + j * L + v * W, p);
          sum[v] += p;
        }
      }
      for (int v = 0; v < kVecs; ++v) {
        l[g][v] = l[g][v] * alpha[v] + sum[v];
        m[g][v] = mx[v];
      }
      for (int64_t c = 0; c < d; ++c) {
        for (int v = 0; v < kVecs; ++v) vstore(ot + c * L + v * W, vload(ot + c * L + v * W) * alpha[v]);
      }
      gemm<T, true, 0>(ot, d, vb, 1, d, st, nb);  // O^T += V^T P^T
    }
  }
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t g0 = q0 + g * L, n = std::min(L, P.nq - g0);
    T mm[L], ll[L];
    for (int v = 0; v < kVecs; ++v) {
      vstore(mm + v * W, m[g][v]);
      vstore(ll + v * W, l[g][v]);
    }
    const T* ot = ws[kGroups<T> + g];
    const int64_t bh = b * P.heads + h;
    for (int64_t i = 0; i < n; ++i) {
      const T inv = T(1) / ll[i];
      S* o = out + (bh * P.nq + g0 + i) * d;
      for (int64_t c = 0; c < d; ++c) o[c] = static_cast<S>(ot[c * L + i] * inv);
      lse[bh * P.nq + g0 + i] = (mm[i] + Units<T>::log(ll[i])) / Units<T>::kPerNat;
    }
  }
}

// ---- backward, query side: delta and dQ --------------------------------------------

// What the two backward passes share for one block of lane groups (kGroups<T> x lanes
// tokens from `first` of `total`): groups in the block, the (batch, head) row, and
// scratch -- `tiles` d x L tiles per group, then five shared buffers (two operand
// blocks of kRows x d, the two score blocks, one row) at `shared`.
template <typename T>
struct BlockScratch {
  int64_t groups, bh;
  Scratch<T> ws;
  T* shared[5];
  BlockScratch(int64_t d, int64_t heads, int64_t b, int64_t h, int64_t total, int64_t first, int64_t tiles)
      : groups(std::min(kGroups<T>, (total - first + kLanes<T> - 1) / kLanes<T>)),
        bh(b * heads + h),
        ws(tiles * kGroups<T> + 5, std::max(d * kLanes<T>, kRows * std::max<int64_t>(d, kLanes<T>))) {
    for (int64_t i = 0; i < 5; ++i) shared[i] = ws[tiles * kGroups<T> + i];
  }
};

template <typename S, typename T, int D>
void dq_task(const Problem<S, T>& P, const BackwardArgs<S, T>& A, int64_t b, int64_t h, int64_t q0) {
  using vec = typename Lanes<T>::vec;
  constexpr int W = Lanes<T>::W;
  constexpr int64_t L = kLanes<T>;
  // per group: Qt, dOt, dQt (d x L), lse, delta lanes; shared: K, V, S^T, dP^T, row scratch
  const int64_t d = D > 0 ? D : P.d;  // a compile-time constant for the specialized widths
  BlockScratch<T> blk(d, P.heads, b, h, P.nq, q0, 3);
  const int64_t groups = blk.groups, bh = blk.bh;
  Scratch<T>& ws = blk.ws;
  T *kb = blk.shared[0], *vb = blk.shared[1], *st = blk.shared[2], *dpt = blk.shared[3], *row = blk.shared[4];
  T lanes_lse[kGroups<T>][L], lanes_delta[kGroups<T>][L];
  const T qmul = P.scale * Units<T>::kPerNat;
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t g0 = q0 + g * L, n = std::min(L, P.nq - g0);
    T* qt = ws[g];
    T* dot = ws[kGroups<T> + g];
    std::fill(qt, qt + d * L, T(0));
    std::fill(dot, dot + d * L, T(0));
    std::fill(ws[2 * kGroups<T> + g], ws[2 * kGroups<T> + g] + d * L, T(0));
    load_rows<D>(P.q, P.coords, P.align, b, h, g0, n, d, qmul, qt, 1, L, row);
    Operand<S> go;
    go.tok = A.grad_out;
    load_rows<D>(go, P.coords, P.align, b, h, g0, n, d, T(1), dot, 1, L, row);
    Operand<S> o;
    o.tok = A.out;
    T* delta = A.delta + bh * P.nq + g0;
    for (int64_t i = 0; i < n; ++i) {
      load_rows<D>(o, P.coords, P.align, b, h, g0 + i, 1, d, T(1), row, d, 1, row);
      T sum = 0;
      for (int64_t c = 0; c < d; ++c) sum += dot[c * L + i] * row[c];
      delta[i] = sum;
    }
    load_lane_values(delta, n, lanes_delta[g]);
    load_lane_values(A.lse + bh * P.nq + g0, n, lanes_lse[g]);
    for (int64_t i = 0; i < L; ++i) lanes_lse[g][i] *= Units<T>::kPerNat;
  }
  for (int64_t k0 = 0; k0 < P.nk; k0 += kRows) {
    const int64_t nb = std::min(kRows, P.nk - k0);
    load_rows<D>(P.k, P.coords, P.align, b, h, k0, nb, d, T(1), kb, d, 1, row);
    load_rows<D>(P.v, P.coords, P.align, b, h, k0, nb, d, T(1), vb, d, 1, row);
    for (int64_t g = 0; g < groups; ++g) {
      gemm<T, false, D>(st, nb, kb, d, 1, ws[g], d);            // S^T = K Q^T
      gemm<T, false, D>(dpt, nb, vb, d, 1, ws[kGroups<T> + g], d);  // dP^T = V dO^T
      for (int v = 0; v < kVecs; ++v) {
        const vec lse = vload(lanes_lse[g] + v * W), delta = vload(lanes_delta[g] + v * W);
        for (int64_t j = 0; j < nb; ++j) {
          const vec p = Units<T>::exp(vload(st + j * L + v * W) - lse);
          vstore(st + j * L + v * W, p * (vload(dpt + j * L + v * W) - delta));  // dS^T
        }
      }
      gemm<T, true, 0>(ws[2 * kGroups<T> + g], d, kb, 1, d, st, nb);  // dQ^T += K^T dS^T
    }
  }
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t g0 = q0 + g * L, n = std::min(L, P.nq - g0);
    const T* dqt = ws[2 * kGroups<T> + g];
    for (int64_t i = 0; i < n; ++i) {
      T* o = A.gq + (bh * P.nq + g0 + i) * d;
      for (int64_t c = 0; c < d; ++c) o[c] = dqt[c * L + i] * P.scale;
    }
  }
}

// ---- backward, key side: dK and dV --------------------------------------------------

template <typename S, typename T, int D>
void dkv_task(const Problem<S, T>& P, const BackwardArgs<S, T>& A, int64_t b, int64_t h, int64_t k0) {
  using vec = typename Lanes<T>::vec;
  constexpr int W = Lanes<T>::W;
  constexpr int64_t L = kLanes<T>;
  // per group: Kt, Vt, dKt, dVt (d x L); shared: Q, dO (kRows x d), S, dP (kRows x L), row
  const int64_t d = D > 0 ? D : P.d;
  BlockScratch<T> blk(d, P.heads, b, h, P.nk, k0, 4);
  const int64_t groups = blk.groups, bh = blk.bh;
  Scratch<T>& ws = blk.ws;
  T *qb = blk.shared[0], *dob = blk.shared[1], *s = blk.shared[2], *dp = blk.shared[3], *row = blk.shared[4];
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t g0 = k0 + g * L, n = std::min(L, P.nk - g0);
    for (int64_t a = 0; a < 4; ++a) std::fill(ws[a * kGroups<T> + g], ws[a * kGroups<T> + g] + d * L, T(0));
    load_rows<D>(P.k, P.coords, P.align, b, h, g0, n, d, T(1), ws[g], 1, L, row);
    load_rows<D>(P.v, P.coords, P.align, b, h, g0, n, d, T(1), ws[kGroups<T> + g], 1, L, row);
  }
  Operand<S> go;
  go.tok = A.grad_out;
  const T smul = P.scale * Units<T>::kPerNat;
  for (int64_t i0 = 0; i0 < P.nq; i0 += kRows) {
    const int64_t nb = std::min(kRows, P.nq - i0);
    load_rows<D>(P.q, P.coords, P.align, b, h, i0, nb, d, T(1), qb, d, 1, row);
    load_rows<D>(go, P.coords, P.align, b, h, i0, nb, d, T(1), dob, d, 1, row);
    const T* lse = A.lse + bh * P.nq + i0;
    const T* delta = A.delta + bh * P.nq + i0;
    for (int64_t g = 0; g < groups; ++g) {
      gemm<T, false, D>(s, nb, qb, d, 1, ws[g], d);              // S = Q K^T
      gemm<T, false, D>(dp, nb, dob, d, 1, ws[kGroups<T> + g], d);  // dP = dO V^T
      for (int64_t i = 0; i < nb; ++i) {
        const T lse_i = lse[i] * Units<T>::kPerNat, delta_i = delta[i];
        for (int v = 0; v < kVecs; ++v) {
          const vec p = Units<T>::exp(vload(s + i * L + v * W) * smul - lse_i);
          vstore(s + i * L + v * W, p);
          vstore(dp + i * L + v * W, p * (vload(dp + i * L + v * W) - delta_i));  // dS
        }
      }
      gemm<T, true, 0>(ws[3 * kGroups<T> + g], d, dob, 1, d, s, nb);  // dV^T += dO^T P
      gemm<T, true, 0>(ws[2 * kGroups<T> + g], d, qb, 1, d, dp, nb);  // dK^T += Q^T dS
    }
  }
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t g0 = k0 + g * L, n = std::min(L, P.nk - g0);
    const T* dkt = ws[2 * kGroups<T> + g];
    const T* dvt = ws[3 * kGroups<T> + g];
    for (int64_t i = 0; i < n; ++i) {
      T* ok = A.gk + (bh * P.nk + g0 + i) * d;
      T* ov = A.gv + (bh * P.nk + g0 + i) * d;
      for (int64_t c = 0; c < d; ++c) {
        ok[c] = dkt[c * L + i] * P.scale;
        ov[c] = dvt[c * L + i];
      }
    }
  }
}

// ---- drivers: at::parallel_for over (batch, head, block of kGroups<T> * lanes tokens) -------

template <typename Fn>
void for_each_block(int64_t batch, int64_t heads, int64_t n, int64_t block, const Fn& fn) {
  const int64_t blocks = (n + block - 1) / block;
  at::parallel_for(0, batch * heads * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t bh = t / blocks;
      fn(bh / heads, bh % heads, (t % blocks) * block);
    }
  });
}

template <typename S, typename T, int D>
void forward_d(const Problem<S, T>& P, S* out, T* lse) {
  for_each_block(P.batch, P.heads, P.nq, kGroups<T> * kLanes<T>,
                 [&](int64_t b, int64_t h, int64_t q0) { forward_task<S, T, D>(P, b, h, q0, out, lse); });
}

template <typename S, typename T, int D>
void backward_d(const Problem<S, T>& P, const BackwardArgs<S, T>& A) {
  // dQ first: it also writes delta, which the key side reads.
  for_each_block(P.batch, P.heads, P.nq, kGroups<T> * kLanes<T>,
                 [&](int64_t b, int64_t h, int64_t q0) { dq_task<S, T, D>(P, A, b, h, q0); });
  for_each_block(P.batch, P.heads, P.nk, kGroups<T> * kLanes<T>,
                 [&](int64_t b, int64_t h, int64_t k0) { dkv_task<S, T, D>(P, A, b, h, k0); });
}

// The head dimension as a compile-time constant where the detector needs it unrolled:
// fp32 accumulation on the vector ISAs (fp64 and the baseline variant, which exist for
// exactness and portability, take the runtime-d code and keep the build small).
#define COORKERN_WITH_HEAD_DIM(d, CALL)                                     \
  do {                                                                      \
    if constexpr (std::is_same_v<T, double> || kTileRows == 1) {            \
      CALL(0);                                                              \
    } else {                                                                \
      switch (d) {                                                          \
        case 8: CALL(8); break;                                             \
        case 16: CALL(16); break;                                           \
        case 32: CALL(32); break;                                           \
        case 64: CALL(64); break;                                           \
        default: CALL(0); break;                                            \
      }                                                                     \
    }                                                                       \
  } while (0)

template <typename S, typename T>
void forward_impl(const Problem<S, T>& P, S* out, T* lse) {
#define COORKERN_FWD(D) forward_d<S, T, D>(P, out, lse)
  COORKERN_WITH_HEAD_DIM(P.d, COORKERN_FWD);
#undef COORKERN_FWD
}

template <typename S, typename T>
void backward_impl(const Problem<S, T>& P, const BackwardArgs<S, T>& A) {
#define COORKERN_BWD(D) backward_d<S, T, D>(P, A)
  COORKERN_WITH_HEAD_DIM(P.d, COORKERN_BWD);
#undef COORKERN_BWD
}
#undef COORKERN_WITH_HEAD_DIM
