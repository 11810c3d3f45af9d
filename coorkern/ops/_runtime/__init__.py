"""The kernel runtime shared by every op: which implementation runs (``backend``), loading
the C++ library (``extension``), registering ops with ``torch.library`` (``library``) and the
host-side launch helpers of the Triton kernels (``host``)."""
