"""One module per op: its Triton kernels, host launch, registration and autograd."""
