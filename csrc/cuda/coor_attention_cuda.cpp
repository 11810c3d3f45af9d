// Coordinate attention on CUDA tensors for C++ callers: the Triton kernels of
// coorkern.ops.coor_attention, compiled ahead of time (AOT_VARIANTS in
// coorkern.ops.coor_attention.aot), launched in the order and with the arguments of its
// Python host code (_triton_forward / _triton_backward).  Registered under the CUDA key;
// Python replaces these registrations with its own CUDA path when coorkern is imported,
// so they serve libtorch programs only.
//
// Forward : sample K, sample Q ("qk") or V ("kv") into tokens, flash attention -> (out, lse).
// Backward: sample again, delta = rowsum(dO * O), dK/dV pass, dQ pass, scatter the sampled
//           tokens' gradients to their maps (fp32 atomics) with the coordinate gradient.
// What the AOT set fixes at build time: one launch configuration per arch (no
// autotuning); float32 (tf32 or ieee dots, following at::globalContext().allowTF32CuBLAS()),
// float64, float16 and bfloat16; head widths d < 16 or multiples of 16 up to 128.  The
// deterministic scatter is not compiled: torch.use_deterministic_algorithms(True) gets an
// error (Python runs it).
// Every launch of a call is planned and its arguments checked against the compiled
// signature before the first one starts (python_tests call this with CPU tensors).
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include "cuda/aot.h"

namespace coorkern {
namespace {

constexpr const char* kOp = "coor_attention";

struct Launch {
  std::string variant;
  int64_t rows;       // rows (tokens) the grid covers per (batch, head), or in all
  const char* block;  // the constexpr that blocks them
  int64_t groups;     // batch * heads (1 for the row-dot)
  std::vector<aot::Arg> args;
};

// What every variant key of one call shares: "aligned=..,d=..,dtype=.." (a key lists its
// entries sorted by name: coorkern.ops._aot.codegen.variant_key).
struct Family {
  std::string prefix;
  at::ScalarType type;
  at::ScalarType acc;  // accumulation: float64 for float64, else float32
  int64_t d;
};

int32_t i32(int64_t v, const char* what) {
  TORCH_CHECK(v >= 0 && v <= std::numeric_limits<int32_t>::max(), "coorkern::coor_attention (CUDA, AOT): ", what,
              " = ", v, " does not fit the kernels' 32-bit arguments");
  return static_cast<int32_t>(v);
}

Family family(const at::Tensor& q) {
  const auto type = q.scalar_type();
  TORCH_CHECK(type == at::kFloat || type == at::kDouble || type == at::kHalf || type == at::kBFloat16,
              "coorkern::coor_attention: q, k and v must be float32, float64, float16 or bfloat16, got ", type);
  TORCH_CHECK(!at::globalContext().deterministicAlgorithms(),
              "coorkern::coor_attention: the ahead-of-time CUDA kernels have no deterministic backward (it scatters "
              "with atomics); with torch.use_deterministic_algorithms(True) run it from Python");
  const int64_t d = q.size(-1);
  TORCH_CHECK(d >= 1 && (d < 16 || (d % 16 == 0 && d <= 128)),
              "coorkern::coor_attention: the ahead-of-time CUDA kernels take head widths d < 16 or multiples of 16 "
              "up to 128, got d = ", d);
  const int64_t block_d = d <= 16 ? 16 : d <= 32 ? 32 : d <= 64 ? 64 : 128;
  return {std::string("aligned=") + (d % 16 == 0 ? "1" : "0") + ",d=" + std::to_string(block_d) +
              ",dtype=" + aot::triton_dtype(type),
          type, type == at::kDouble ? at::kDouble : at::kFloat, d};
}

// Contiguous and 16-byte aligned: the kernels are compiled for that.
at::Tensor operand(const at::Tensor& t, at::ScalarType type) {
  auto c = t.to(type).contiguous();
  return reinterpret_cast<uintptr_t>(c.data_ptr()) % 16 == 0 ? c : c.clone();
}

std::string precision(at::ScalarType type) {
  return type == at::kFloat && at::globalContext().allowTF32CuBLAS() ? "tf32" : "ieee";
}

void check_operands(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& coords,
                    bool qk) {
  const auto& map = qk ? q : v;
  const auto& tokens = qk ? v : q;
  TORCH_CHECK(map.dim() == 5 && k.dim() == 5 && tokens.dim() == 4,
              "coorkern::coor_attention: expected maps (B, heads, H, W, d) and tokens (B, heads, N, d)");
  TORCH_CHECK(k.sizes() == map.sizes(), "coorkern::coor_attention: the two sampled maps must have one shape");
  TORCH_CHECK((coords.dim() == 3 || coords.dim() == 4) && coords.size(-1) == 2,
              "coorkern::coor_attention: coords must be (B, [heads,] N, 2)");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && k.scalar_type() == v.scalar_type(),
              "coorkern::coor_attention: q, k and v must have one dtype");
}

// Token strides (b, h, n) of a contiguous (B, heads, N, d) tensor; the d stride is the constexpr 1.
void add_token_strides(std::vector<aot::Arg>& args, const at::Tensor& t) {
  for (int i = 0; i < 3; ++i) args.push_back(aot::Arg::i32(i32(t.stride(i), "a token stride")));
}

// Coordinate strides (b, h, n) of contiguous coords; h is 0 when the heads share them.
void add_coord_strides(std::vector<aot::Arg>& args, const at::Tensor& c) {
  const bool shared = c.dim() == 3;
  args.push_back(aot::Arg::i32(i32(c.stride(0), "a coordinate stride")));
  args.push_back(aot::Arg::i32(shared ? 0 : i32(c.stride(1), "a coordinate stride")));
  args.push_back(aot::Arg::i32(i32(c.stride(shared ? 1 : 2), "a coordinate stride")));
}

void add_map_sizes(std::vector<aot::Arg>& args, const at::Tensor& m, int64_t n) {
  for (int64_t v : {m.size(1), n, m.size(2), m.size(3), m.size(4)}) args.push_back(aot::Arg::i32(i32(v, "a size")));
}

void add_map_strides(std::vector<aot::Arg>& args, const at::Tensor& m) {
  for (int i = 0; i < 4; ++i) args.push_back(aot::Arg::i32(i32(m.stride(i), "a map stride")));
}

// Sample map m (B, heads, H, W, d) at coords into contiguous tokens (B, heads, N, d).
at::Tensor plan_sample(std::vector<Launch>& plan, const Family& f, const at::Tensor& m, const at::Tensor& c,
                       bool align) {
  const int64_t n = c.size(-2);
  auto out = at::empty({m.size(0), m.size(1), n, f.d}, m.options());
  Launch l{std::string("align_corners=") + (align ? "1," : "0,") + f.prefix + ",name=sample", n, "BLOCK",
           m.size(0) * m.size(1), {}};
  l.args = {aot::Arg::tensor(m), aot::Arg::tensor(c), aot::Arg::tensor(out)};
  add_map_sizes(l.args, m, n);
  add_map_strides(l.args, m);
  add_coord_strides(l.args, c);
  plan.push_back(std::move(l));
  return out;
}

// Gradient of plan_sample: the map gradient (accumulation dtype, returned) and the coordinate gradient
// written (or with add_dc, added) into dc (B, heads, N, 2).
at::Tensor plan_scatter(std::vector<Launch>& plan, const Family& f, const at::Tensor& m, const at::Tensor& grad,
                        const at::Tensor& c, const at::Tensor& dc, bool align, bool add_dc) {
  const int64_t n = grad.size(2);
  auto dmap = at::zeros(m.sizes(), m.options().dtype(f.acc));
  Launch l{std::string("add_dc=") + (add_dc ? "1" : "0") + ",align_corners=" + (align ? "1," : "0,") + f.prefix +
               ",name=scatter",
           n, "BLOCK", m.size(0) * m.size(1), {}};
  l.args = {aot::Arg::tensor(m), aot::Arg::tensor(grad), aot::Arg::tensor(dmap), aot::Arg::tensor(dmap),
            aot::Arg::unused_pointer(dmap, "*i64"), aot::Arg::tensor(c), aot::Arg::tensor(dc)};
  add_map_sizes(l.args, m, n);
  l.args.push_back(aot::Arg::i32(i32(m.numel() / f.d, "the map's pixel count")));
  add_map_strides(l.args, m);
  add_coord_strides(l.args, c);
  plan.push_back(std::move(l));
  return dmap;
}

// The attention passes' shared tail: heads, n_q, n_kv, d, scale (fp32 hi + lo), strides.
void add_attention_tail(std::vector<aot::Arg>& args, const at::Tensor& qs, const at::Tensor& ks,
                        const at::Tensor& vs, double scale) {
  const float hi = static_cast<float>(scale);
  const float lo = static_cast<float>(scale - static_cast<double>(hi));
  for (int64_t v : {qs.size(1), qs.size(2), ks.size(2), qs.size(3)}) args.push_back(aot::Arg::i32(i32(v, "a size")));
  args.push_back(aot::Arg::f32(hi));
  args.push_back(aot::Arg::f32(lo));
  add_token_strides(args, qs);
  add_token_strides(args, ks);
  add_token_strides(args, vs);
}

// Checks every planned launch (variant found, argument types, alignment), then launches.
void run(const std::vector<Launch>& plan, const at::Device& device) {
  for (const auto& l : plan) aot::check_launch(kOp, l.variant, l.args);
  for (const auto& l : plan) {
    const int64_t block = aot::constexpr_int(kOp, l.variant, l.block, device);
    const int64_t programs = (l.rows + block - 1) / block * l.groups;
    aot::launch(device, kOp, l.variant, {static_cast<uint32_t>(i32(programs, "the grid")), 1, 1}, l.args);
  }
}

struct Sampled {
  at::Tensor k, q, v, c;  // contiguous operands (maps or tokens) and fp32 coords
  at::Tensor ks, qs, vs;  // the attention's token operands
};

// The prologue of both directions: checks, the variant family, the sampling launches.
struct Call {
  bool qk;
  Family f;
  std::vector<Launch> plan;
  Sampled s;
};

Call begin(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& coords,
           c10::string_view sample, bool align) {
  TORCH_CHECK(sample == "qk" || sample == "kv", "coorkern::coor_attention: sample must be 'qk' or 'kv', got '",
              std::string(sample), "'");
  check_operands(q, k, v, coords, sample == "qk");
  Call call{sample == "qk", family(q), {}, {}};
  const Family& f = call.f;
  Sampled& s = call.s;
  s.q = operand(q, f.type);
  s.k = operand(k, f.type);
  s.v = operand(v, f.type);
  s.c = operand(coords, f.acc);
  s.ks = plan_sample(call.plan, f, s.k, s.c, align);
  s.qs = call.qk ? plan_sample(call.plan, f, s.q, s.c, align) : s.q;
  s.vs = call.qk ? s.v : plan_sample(call.plan, f, s.v, s.c, align);
  return call;
}

std::tuple<at::Tensor, at::Tensor> coor_attention_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                       const at::Tensor& coords, c10::string_view sample,
                                                       double scale, bool align_corners) {
  Call call = begin(q, k, v, coords, sample, align_corners);
  const Family& f = call.f;
  const Sampled& s = call.s;
  std::vector<Launch>& plan = call.plan;
  const int64_t batch = s.qs.size(0), heads = s.qs.size(1), n_q = s.qs.size(2);
  auto out = at::empty({batch, heads, n_q, f.d}, s.qs.options());
  auto lse = at::empty({batch, heads, n_q}, s.qs.options().dtype(f.acc));
  Launch fwd{f.prefix + ",name=fwd,precision=" + precision(f.type), n_q, "BLOCK_M", batch * heads, {}};
  fwd.args = {aot::Arg::tensor(s.qs), aot::Arg::tensor(s.ks), aot::Arg::tensor(s.vs), aot::Arg::tensor(out),
              aot::Arg::tensor(lse)};
  add_attention_tail(fwd.args, s.qs, s.ks, s.vs, scale);
  plan.push_back(std::move(fwd));
  run(plan, q.device());
  return {out.to(q.scalar_type()), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> coor_attention_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& coords, const at::Tensor& out, const at::Tensor& lse, c10::string_view sample, double scale,
    bool align_corners) {
  Call call = begin(q, k, v, coords, sample, align_corners);
  const Family& f = call.f;
  const Sampled& s = call.s;
  std::vector<Launch>& plan = call.plan;
  const bool qk = call.qk;
  const int64_t batch = s.qs.size(0), heads = s.qs.size(1), n_q = s.qs.size(2), n = s.ks.size(2);
  const auto acc = s.qs.options().dtype(f.acc);
  const auto d_out = operand(grad_out, f.type);
  const auto o = operand(out, f.type);
  const auto lse_acc = operand(lse, f.acc);

  auto delta = at::empty({batch, heads, n_q}, acc);
  Launch row_dot{f.prefix + ",name=rowdot", batch * heads * n_q, "BLOCK", 1, {}};
  row_dot.args = {aot::Arg::tensor(d_out), aot::Arg::tensor(o), aot::Arg::tensor(delta),
                  aot::Arg::i32(i32(batch * heads * n_q, "the row count")), aot::Arg::i32(i32(f.d, "d"))};
  plan.push_back(std::move(row_dot));

  // Gradients of sampled tensors stay in the accumulation dtype for the scatter; the others are final.
  auto dks = at::empty({batch, heads, n, f.d}, acc);
  auto dvs = at::empty({batch, heads, n, f.d}, qk ? s.qs.options() : acc);
  auto dqs = at::empty({batch, heads, n_q, f.d}, qk ? acc : s.qs.options());
  const std::string pass = ",precision=" + precision(f.type) + ",sample=" + std::string(sample);
  Launch dkv{f.prefix + ",name=dkv" + pass, n, "BLOCK_N", batch * heads, {}};
  Launch dq{f.prefix + ",name=dq" + pass, n_q, "BLOCK_M", batch * heads, {}};
  for (Launch* l : {&dkv, &dq}) {
    l->args = {aot::Arg::tensor(s.qs), aot::Arg::tensor(s.ks), aot::Arg::tensor(s.vs), aot::Arg::tensor(d_out),
               aot::Arg::tensor(lse_acc), aot::Arg::tensor(delta)};
  }
  dkv.args.push_back(aot::Arg::tensor(dks));
  dkv.args.push_back(aot::Arg::tensor(dvs));
  dq.args.push_back(aot::Arg::tensor(dqs));
  add_attention_tail(dkv.args, s.qs, s.ks, s.vs, scale);
  add_attention_tail(dq.args, s.qs, s.ks, s.vs, scale);
  plan.push_back(std::move(dkv));
  plan.push_back(std::move(dq));

  auto dc = at::empty({batch, heads, n, 2}, acc);
  auto dk = plan_scatter(plan, f, s.k, dks, s.c, dc, align_corners, /*add_dc=*/false);
  auto d_other = plan_scatter(plan, f, qk ? s.q : s.v, qk ? dqs : dvs, s.c, dc, align_corners, /*add_dc=*/true);
  run(plan, q.device());

  auto dq_out = qk ? d_other : dqs;
  auto dv_out = qk ? dvs : d_other;
  auto dcoords = coords.dim() == 3 ? dc.sum(1) : dc;  // shared by the heads
  return {dq_out.to(q.scalar_type()), dk.to(k.scalar_type()), dv_out.to(v.scalar_type()),
          dcoords.to(coords.scalar_type())};
}

}  // namespace
}  // namespace coorkern

TORCH_LIBRARY_IMPL(coorkern, CUDA, m) {
  m.impl("coor_attention", &coorkern::coor_attention_cuda);
  m.impl("coor_attention_backward", &coorkern::coor_attention_backward_cuda);
}
