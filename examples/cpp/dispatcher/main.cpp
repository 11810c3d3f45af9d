// Calls coorkern::central_loss through the PyTorch dispatcher by name, as code does that
// only knows the op's schema (a model runner, a TorchScript-style interpreter): no
// coorkern header, no coorkern symbol.  Prints "central_loss <value>" for fixed inputs;
// python_tests/cpp/test_cpp_dispatcher.py compares it with the Python op.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdio>

int main() {
  // findSchemaOrThrow fails with "Could not find schema for coorkern::central_loss" when the
  // library that registers it was not loaded.
  const auto op = c10::Dispatcher::singleton()
                      .findSchemaOrThrow("coorkern::central_loss", "")
                      .typed<at::Tensor(const at::Tensor&, const at::Tensor&, double, c10::string_view)>();
  // logits[i] = 4 sin(0.37 i), target[i] = |sin(0.11 i + 0.5)| over a (2, 3, 9, 11) map.
  const auto logits = at::arange(2 * 3 * 9 * 11, at::kDouble).mul(0.37).sin().mul(4.0).reshape({2, 3, 9, 11});
  const auto target = at::arange(2 * 3 * 9 * 11, at::kDouble).mul(0.11).add(0.5).sin().abs().reshape({2, 3, 9, 11});
  const auto loss = op.call(logits, target, 2.0, "mean");
  std::printf("central_loss %.17g\n", loss.item<double>());
  return 0;
}
