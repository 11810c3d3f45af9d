"""The ops' host integer helpers (coorkern/ops/_host.py) against Triton's own."""

from __future__ import annotations

import triton

from coorkern.ops._host import cdiv, next_power_of_2


def test_cdiv_and_next_power_of_2_agree_with_triton():
    for a in list(range(0, 600)) + [2**31 - 1, 2**31, 2**40 + 3]:
        for b in (1, 2, 3, 16, 64, 1000, 2**20):
            assert cdiv(a, b) == triton.cdiv(a, b), (a, b)
    for n in list(range(1, 3000)) + [2**31 - 1, 2**31, 2**31 + 1]:
        assert next_power_of_2(n) == triton.next_power_of_2(n), n
