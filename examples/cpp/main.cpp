// Runs every coorkern op forward and backward through its C++ entry points on
// deterministic inputs, on CPU and (when available) CUDA, and prints for each result
// "<device> <name> <sum> <weighted sum>" (python_tests/cpp/test_cpp_library.py compares
// these lines with the Python ops on the same inputs).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <coorkern/ops.h>

#include <cstdio>
#include <initializer_list>
#include <string>

namespace {

// sin(i * freq + phase) over the elements in order: the same numbers in Python.
at::Tensor pattern(at::IntArrayRef shape, double freq, double phase, const at::Device& device) {
  int64_t n = 1;
  for (int64_t s : shape) n *= s;
  return at::arange(n, at::TensorOptions(at::kDouble)).mul(freq).add(phase).sin().reshape(shape).to(device);
}

void print(const std::string& device, const std::string& name, const at::Tensor& t) {
  const auto x = t.to(at::kCPU, at::kDouble);
  const auto weights = pattern(x.sizes(), 0.7, 0.3, at::kCPU);
  std::printf("%s %s %.17g %.17g\n", device.c_str(), name.c_str(), x.sum().item<double>(),
              x.mul(weights).sum().item<double>());
}

bool has_kernel(const char* op, const at::Device& device) {
  const auto handle = c10::Dispatcher::singleton().findSchemaOrThrow(op, "");
  return handle.hasKernelForDispatchKey(device.is_cuda() ? c10::DispatchKey::CUDA : c10::DispatchKey::CPU);
}

void run(const at::Device& device) {
  const std::string dev = device.is_cuda() ? "cuda" : "cpu";
  // Central loss: logits (B, L, H, W), a target in [0, 1], landmarks (B, L, 2) as pixel (x, y).
  const auto logits = pattern({2, 3, 9, 11}, 0.37, 0.0, device).mul(4.0);
  const auto target = pattern({2, 3, 9, 11}, 0.11, 0.5, device).abs();
  const auto landmarks = pattern({2, 3, 2}, 0.61, 0.0, device).add(1.0).mul(4.5);
  const auto one = at::ones({}, logits.options());

  print(dev, "central_loss", coorkern::central_loss(logits, target, 2.0, "mean"));
  print(dev, "central_loss_backward", coorkern::central_loss_backward(one, logits, target, 2.0, "mean"));
  const auto grad_map = pattern({2, 3, 9, 11}, 0.23, 1.0, device);
  print(dev, "central_loss_from_landmarks",
        coorkern::central_loss_from_landmarks(logits, landmarks, 2.0, 1.5, "none", 4.0));
  print(dev, "central_loss_from_landmarks_backward",
        coorkern::central_loss_from_landmarks_backward(grad_map, logits, landmarks, 2.0, 1.5, "none", 4.0));

  if (!has_kernel("coorkern::coor_attention", device)) {
    std::printf("%s coor_attention: no kernel for this device in libcoorkern_ops\n", dev.c_str());
    return;
  }
  // Coordinate attention, sample="qk": q, k maps (B, heads, H, W, d), v tokens (B, heads, N, d),
  // coords (B, N, 2) in [-1, 1].
  const auto q = pattern({1, 2, 5, 6, 8}, 0.29, 0.1, device);
  const auto k = pattern({1, 2, 5, 6, 8}, 0.17, 0.7, device);
  const auto v = pattern({1, 2, 7, 8}, 0.41, 0.2, device);
  const auto coords = pattern({1, 7, 2}, 0.83, 0.4, device).mul(0.9);
  const auto [out, lse] = coorkern::coor_attention(q, k, v, coords, "qk");
  print(dev, "coor_attention", out);
  const auto grad_out = pattern({1, 2, 7, 8}, 0.53, 0.9, device);
  const auto [dq, dk, dv, dcoords] = coorkern::coor_attention_backward(grad_out, q, k, v, coords, out, lse, "qk");
  print(dev, "coor_attention_backward.dq", dq);
  print(dev, "coor_attention_backward.dk", dk);
  print(dev, "coor_attention_backward.dv", dv);
  print(dev, "coor_attention_backward.dcoords", dcoords);
}

}  // namespace

int main() {
  std::printf("build %s\n", coorkern_build_info());
  run(at::kCPU);
  if (at::hasCUDA()) run(at::Device(at::kCUDA, 0));
  return 0;
}
