// Public C++ API of libcoorkern_ops.so (CMake: find_package(coorkern), target coorkern::ops).
//
// Typed entry points for every coorkern op and its backward.  They call the op through
// the PyTorch dispatcher, so they run the kernel registered for the tensors' device:
// the C++ CPU kernels, and on CUDA the ahead-of-time compiled Triton kernels when the
// library was built with them (sm_80 / sm_90 cubins, sm_80 PTX for newer GPUs; the central
// loss in float32 / float64, coor_attention in float32 / float64 / float16 / bfloat16 with
// head widths d < 16 or multiples of 16 up to 128, not under deterministic algorithms).  Semantics, shapes and
// defaults are those of the Python functions (coorkern.central_loss, ...).  There is no
// autograd from C++: call the *_backward functions for the gradients.  Loading the library
// also registers the ops under their dispatcher names (coorkern::central_loss, ...) for
// callers that prefer c10::Dispatcher; the CMake target coorkern::ops keeps the library
// linked even in a program that references none of its symbols (docs/cpp.md).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <optional>
#include <tuple>

#if defined(_WIN32)
#define COORKERN_API __declspec(dllimport)
#else
#define COORKERN_API __attribute__((visibility("default")))
#endif

namespace coorkern {

// Central loss of logits against a target in [0, 1] of the same shape; reduction is
// "mean", "sum" or "none".  Returns a 0-dim tensor (or the per-element loss for "none").
COORKERN_API at::Tensor central_loss(const at::Tensor& logits, const at::Tensor& target, double r = 2.0,
                                     c10::string_view reduction = "mean");

// d(loss)/d(logits) given d(result)/d(loss) (grad_output: 0-dim, or logits' shape for "none").
COORKERN_API at::Tensor central_loss_backward(const at::Tensor& grad_output, const at::Tensor& logits,
                                              const at::Tensor& target, double r = 2.0,
                                              c10::string_view reduction = "mean");

// Central loss against Gaussians (sigma in pixels, peak 1) around landmarks (*, 2) given
// as pixel (x, y) for logits (*, H, W); NaN marks a missing landmark; radius cuts the Gaussian.
COORKERN_API at::Tensor central_loss_from_landmarks(const at::Tensor& logits, const at::Tensor& landmarks,
                                                    double sigma = 3.0, double r = 2.0,
                                                    c10::string_view reduction = "mean",
                                                    std::optional<double> radius = std::nullopt);

COORKERN_API at::Tensor central_loss_from_landmarks_backward(const at::Tensor& grad_output, const at::Tensor& logits,
                                                             const at::Tensor& landmarks, double sigma = 3.0,
                                                             double r = 2.0, c10::string_view reduction = "mean",
                                                             std::optional<double> radius = std::nullopt);

// Coordinate-indexed attention: maps (B, heads, H, W, d), tokens (B, heads, N, d), coords
// (B, N, 2) or (B, heads, N, 2) normalized as in grid_sample; sample is "qk" (q and k
// sampled, v tokens) or "kv".  scale defaults to d^-1/2.  Returns (out, lse); keep both
// for coor_attention_backward, which returns (dq, dk, dv, dcoords).
COORKERN_API std::tuple<at::Tensor, at::Tensor> coor_attention(const at::Tensor& q, const at::Tensor& k,
                                                               const at::Tensor& v, const at::Tensor& coords,
                                                               c10::string_view sample = "qk",
                                                               std::optional<double> scale = std::nullopt,
                                                               bool align_corners = true);

COORKERN_API std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> coor_attention_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& coords, const at::Tensor& out, const at::Tensor& lse, c10::string_view sample = "qk",
    std::optional<double> scale = std::nullopt, bool align_corners = true);

}  // namespace coorkern

// What the library was built with: "cpu;cuda_aot=<op>@sm_<arch>x<count>,..." when the CUDA
// (Triton AOT) kernels are in it, "cpu;cuda_aot=none" when not (docs/cpp.md says how to get them).
extern "C" COORKERN_API const char* coorkern_build_info();
