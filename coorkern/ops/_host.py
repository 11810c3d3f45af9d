"""Integer helpers of the ops' host code (launch grids, block widths).

``triton.cdiv`` and ``triton.next_power_of_2`` are ``ConstexprFunction`` wrappers (triton
3.6-3.9): ~1.8 us per call from Python on this machine, against ~0.02 us for the plain
arithmetic -- and the attention backward made 23 such calls per step.  The H200 runs found
the ops' Python host path, not their kernels, the bottleneck at the detector's sizes.
"""

from __future__ import annotations


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for ints, b > 0."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(n - 1, 0).bit_length()
