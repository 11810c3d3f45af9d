// Finds an op's schema in the dispatcher once, typed: what the entry points of
// <coorkern/ops.h> call, so that the kernel registered for the tensors' device runs.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>

namespace coorkern {
namespace ops {

template <typename Signature>
c10::TypedOperatorHandle<Signature> lookup(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

}  // namespace ops
}  // namespace coorkern
