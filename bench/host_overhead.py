"""Where the host time of coorkern's CUDA ops goes: microseconds per call, layer by layer.

    python bench/host_overhead.py [--device cuda] [--iters 200]

The H200 runs found both ops host-bound: the central loss spends ~1 ms of wall clock per
forward + backward on 0.05-0.19 ms of kernels, and the Triton attention 2.5 ms on 0.29 ms
(`bench/RESULTS.md`).  This times each layer between the user's call and the GPU on inputs
so small that the GPU is never the bottleneck, so the time per call is host time:

* the floor: an empty Triton kernel with the attention kernels' argument count, launched
  directly and through ``torch.library.wrap_triton`` (outside a triton_op: the
  ``triton_kernel_wrapper_mutation`` higher-order op), and a ``torch.empty``;
* a ``torch.library.custom_op`` with ``register_autograd`` doing nothing, forward and
  forward + backward (the machinery the ops' triton_ops sit behind);
* each op's internals called directly (the loss's and the attention's ``_direct_forward``,
  the attention's ``_direct_backward``: launches + allocations, no dispatch, no autograd), through the
  public function (eagerly: the ops' ``torch.autograd.Function``), forward and forward +
  backward, and through the triton_op that traced calls take.

The difference between rows is what a layer costs; the rows are what to cut next.
``--stub-launches`` replaces the ops' kernel launches by no-ops, so that on a CPU (with
``TRITON_INTERPRET=1``) the op rows time their Python host path alone.  On a
machine without CUDA ``--device cpu`` runs the rows that need no GPU (the Triton rows read
"needs CUDA"; with ``TRITON_INTERPRET=1`` they run under the interpreter, to check this
script, not to measure).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import triton
import triton.language as tl

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import _common  # noqa: E402

import coorkern  # noqa: E402

def host_us(call, device: torch.device, iters: int) -> float:
    """Median over 5 rounds of the host microseconds per ``call()`` (no sync inside a round)."""
    for _ in range(3):
        call()
    _common.sync(device)
    rounds = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(iters):
            call()
        rounds.append((time.perf_counter() - start) / iters * 1e6)
        _common.sync(device)
    return sorted(rounds)[2]


# At module level, not in a function: Triton resolves a kernel's names (its ``tl.constexpr``
# annotation included) in the module's globals, and the first H100 run's empty-kernel rows
# failed to compile with the kernel defined inside a function (triton 3.6: CompilationError
# "at 2:34", the annotation; triton 3.9 looks the kernel up in its module).
@triton.jit
def empty_kernel(p0, p1, p2, p3, p4, a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15, a16,
                 a17, a18, BLOCK: tl.constexpr):
    pass


def _reason(exc: Exception) -> str:
    """One table cell for a failure: the exception's type and its last line -- a Triton
    CompilationError's message starts with the kernel's source and ends with the reason (the
    H100 run of 2026-11-26 printed only "at 2:34: def empty_kernel(...")."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[-1][:160] if lines else ''}".replace("|", "/")


_NOOP = []


def _noop_custom_op():
    if _NOOP:  # defined once per process
        return _NOOP[0]

    @torch.library.custom_op("coorkern_bench::noop", mutates_args=())
    def noop(x: torch.Tensor) -> torch.Tensor:
        return torch.empty_like(x)

    @noop.register_fake
    def _(x):
        return torch.empty_like(x)

    noop.register_autograd(lambda ctx, grad: torch.empty_like(grad))
    _NOOP.append(noop)
    return noop


def rows_for(device: torch.device) -> list[tuple[str, object]]:
    """(name, call or a reason it does not run) of every row."""
    from coorkern.ops.central_loss import op as cl
    from coorkern.ops.coor_attention import op as ca

    # The Triton rows run on CUDA, or on CPU tensors under the interpreter (TRITON_INTERPRET=1,
    # a dry run of this script: interpreter times mean nothing).
    cuda = device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
    gen = torch.Generator().manual_seed(0)
    # Tiny inputs: the GPU work per call is a few microseconds.
    logits = torch.randn(1, 2, 16, 16, generator=gen).to(device).requires_grad_(True)
    landmarks = (torch.rand(1, 2, 2, generator=gen) * 15).to(device)
    fmap = lambda: torch.randn(1, 2, 4, 4, 16, generator=gen).to(device).requires_grad_(True)  # noqa: E731
    q, k, v = fmap(), fmap(), torch.randn(1, 2, 16, 16, generator=gen).to(device).requires_grad_(True)
    coords = (torch.rand(1, 16, 2, generator=gen) * 2 - 1).to(device).requires_grad_(True)
    x = torch.randn(64, device=device, requires_grad=True)
    noop = _noop_custom_op()
    rows: list[tuple[str, object]] = [
        ("torch.empty (1 KiB)", lambda: torch.empty(256, device=device)),
        ("custom_op no-op, forward", lambda: noop(x.detach())),
        ("custom_op no-op, forward + backward", lambda: noop(x).sum().backward()),
    ]
    needs = "needs CUDA"
    if cuda:
        kernel = empty_kernel  # 5 pointers + 19 ints: about the attention kernels' argument count
        ptrs = [torch.empty(16, device=device) for _ in range(5)]
        ints = list(range(1, 20))
        rows += [
            ("empty Triton kernel, 24 args: kernel[grid](...)", lambda: kernel[(1,)](*ptrs, *ints, BLOCK=16)),
            ("  the same through torch.library.wrap_triton",
             lambda: torch.library.wrap_triton(kernel)[(1,)](*ptrs, *ints, BLOCK=16)),
        ]
    else:
        rows += [("empty Triton kernel, 24 args: kernel[grid](...)", needs),
                 ("  the same through torch.library.wrap_triton", needs)]

    # The loss's public rows run its Triton kernels wherever they can (CUDA: what auto runs;
    # the interpreter), else (a plain CPU) its C++ kernels.
    loss_backend = "triton" if cuda else "auto"

    def loss_fwd():
        with coorkern.backend(loss_backend):
            coorkern.central_loss_from_landmarks(logits.detach(), landmarks, sigma=2.0)

    def loss_fwd_bwd():
        logits.grad = None
        with coorkern.backend(loss_backend):
            loss = coorkern.central_loss_from_landmarks(logits, landmarks, sigma=2.0)
        loss.backward()

    attention_args = dict(sample="qk", scale=0.25, align_corners=True)

    def attention_fwd_bwd():
        torch.autograd.grad(coorkern.coor_attention(q, k, v, coords, sample="qk").sum(), (q, k, v, coords))

    with torch.no_grad():
        out, lse = ca._direct_forward(q, k, v, coords, **attention_args) if cuda else (None, None)

    def through_triton_op(step):
        """``step`` with the ops routed as traced calls are (the triton_op), called eagerly."""
        def call():
            eager = cl.plain_eager, ca.plain_eager
            cl.plain_eager = ca.plain_eager = lambda *tensors: False
            try:
                step()
            finally:
                cl.plain_eager, ca.plain_eager = eager
        return call

    triton_op = "needs torch.library.triton_op (torch >= 2.6)"
    triton_rows = [
        ("central loss: _direct_forward (2 launches)",
         lambda: cl._direct_forward(logits.detach(), landmarks, 2.0, 2.0, "mean", None, True)),
        ("central loss: public function, forward", loss_fwd),
        ("central loss: public function, forward + backward", loss_fwd_bwd),
        ("  the same through its triton_op (the traced path)",
         through_triton_op(loss_fwd_bwd) if cl.HAS_TRITON_OP else triton_op),
        ("attention: _direct_forward (3 launches)", lambda: ca._direct_forward(q.detach(), k.detach(), v.detach(),
                                                                                 coords.detach(), **attention_args)),
        ("attention: _direct_backward (9-11 launches)", lambda: ca._direct_backward(
            torch.ones_like(out), q.detach(), k.detach(), v.detach(), coords.detach(), out, lse, **attention_args)),
        ("attention (Triton forced): forward + backward", lambda: _with_triton(attention_fwd_bwd)),
        ("  the same through its triton_op (the traced path)",
         through_triton_op(lambda: _with_triton(attention_fwd_bwd)) if ca.HAS_TRITON_OP else triton_op),
    ]
    rows += [(name, call if cuda or "public function" in name or isinstance(call, str) else needs)
             for name, call in triton_rows]
    # auto: grid_sample + SDPA on CUDA, the C++ kernels on a CPU.
    rows.append(("attention (auto): forward + backward", attention_fwd_bwd))
    return rows


def _with_triton(step):
    with coorkern.backend("triton"):
        step()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--iters", type=int, default=200, help="calls per timed round (5 rounds, median)")
    parser.add_argument("--stub-launches", action="store_true",
                        help="replace both ops' kernel launches by no-ops: the rows then time the Python host path "
                             "alone (with TRITON_INTERPRET=1, a CPU measurement of it; outputs are garbage)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    from coorkern.ops.central_loss import launch as cl_launch
    from coorkern.ops.coor_attention import launch as ca_launch

    launchers = cl_launch._launch, ca_launch._launch
    if args.stub_launches:
        cl_launch._launch = ca_launch._launch = lambda *args, **kwargs: None
    try:
        return _print_rows(device, args)
    finally:  # a caller's later steps (gpu_check's profiles) launch for real
        cl_launch._launch, ca_launch._launch = launchers


def _print_rows(device: torch.device, args) -> int:
    stubbed = "; kernel launches stubbed (Python host path only)" if args.stub_launches else ""
    print(f"device: {_common.device_name(device)}; host microseconds per call, tiny inputs "
          f"(median of 5 rounds of {args.iters} calls){stubbed}", flush=True)
    _common.start_table(["layer", "host us per call"])
    table: list[list[str]] = []
    for name, call in rows_for(device):
        if isinstance(call, str):
            _common.add_row(table, [name, call])
            continue
        try:
            _common.add_row(table, [name, f"{host_us(call, device, args.iters):.1f}"])
        except Exception as exc:  # one broken layer must not hide the others
            _common.add_row(table, [name, f"failed: {_reason(exc)}"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
