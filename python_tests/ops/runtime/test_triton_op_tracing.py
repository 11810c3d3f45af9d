"""The triton_ops' kernels as torch.compile sees them: no kernel may look like it writes an input.

Under torch.compile / export, torch reads each ``wrap_triton`` kernel's TTIR to learn which
tensor arguments it writes, and functionalization copies every "written" op input back into
the caller's tensor.  The analysis is conservative: a pointer that a store's *address* depends
on counts as written.  On an H100 (torch 2.11) the attention backward's scatter counted as
"writing" the coordinates (its atomics' addresses depend on the loaded coordinates), and
``torch.compile`` of ``coorkern.coor_attention`` failed with "a leaf Variable that requires grad
is being used in an in-place operation".

The check runs torch's own analysis on every launch of both ops' triton_op bodies, compiled for
sm_90 without a GPU (a subprocess: the interpreter's kernels have no TTIR), with the launches
recorded instead of run.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from coorkern.ops._runtime.host import HAS_TRITON_OP
from support.paths import REPO_ROOT

pytestmark = pytest.mark.skipif(not HAS_TRITON_OP, reason="torch.library.triton_op needs torch >= 2.6")

_SCRIPT = r'''
import json, sys
import torch, triton
import triton.runtime
from triton.backends.compiler import GPUTarget
from torch._higher_order_ops import triton_kernel_wrap as tkw
from coorkern.ops.central_loss import launch as cl_launch, op as cl
from coorkern.ops.coor_attention import launch as ca_launch, op as ca


class _Sm90:  # what torch's TTIR generation asks the active driver
    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)


triton.runtime.driver.set_active(_Sm90())
tracing = sys.argv[1] == "traced"
ca_launch.tracing = lambda: tracing  # as under torch.compile (or not)
launches = []


def record(kernel, grid, *args, **meta):
    launches.append((kernel, args, meta))


ca_launch._launch = cl_launch._launch = record


def written(kernel, kwargs):
    """Names of the arguments torch's analysis counts as written (None: it gave up)."""
    if hasattr(tkw, "identify_accessed_tensors"):
        tkw.generate_ttir(kernel, kwargs, {})  # raises where the analysis would silently give up
        return sorted(dep.name for dep in tkw.identify_accessed_tensors(kernel, kwargs, {}).read_writes.writes)
    tkw.generate_ttir(kernel, kwargs, {})
    return sorted(tkw.identify_mutated_tensors(kernel, kwargs, {}))


def analyse(case, inputs, run):
    launches.clear()
    run()
    storages = {t.untyped_storage().data_ptr(): name for name, t in inputs.items()}
    rows = []
    for kernel, args, meta in launches:
        jit = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
        kwargs = dict(zip(jit.arg_names, args))
        kwargs.update({k: v for k, v in meta.items() if k in jit.arg_names})
        names = written(kernel, kwargs)
        hit = sorted({storages[kwargs[n].untyped_storage().data_ptr()] for n in names
                      if isinstance(kwargs[n], torch.Tensor) and kwargs[n].untyped_storage().data_ptr() in storages})
        rows.append(dict(case=case, kernel=jit.fn.__name__,
                         written=names, inputs_written=hit))
    return rows


rows = []
torch.manual_seed(0)
for sample in ("qk", "kv"):
    for per_head in (False, True):
        b, h, n, d, hw = 2, 2, 9, 16, (5, 4)
        maps = lambda: torch.randn(b, h, *hw, d)
        q, k, v = (maps(), maps(), torch.randn(b, h, n, d)) if sample == "qk" else (torch.randn(b, h, 7, d), maps(), maps())
        coords = torch.rand(b, h, n, 2) * 2 - 1 if per_head else torch.rand(b, n, 2) * 2 - 1
        fwd_in = dict(q=q, k=k, v=v, coords=coords)
        out = torch.randn(*q.shape[:2], (n if sample == "qk" else 7), d)
        lse, go = torch.randn(out.shape[:-1]), torch.randn(out.shape)
        case = f"attention {sample} {'per-head' if per_head else 'shared'} coords"
        rows += analyse(case + " fwd", fwd_in, lambda: ca._triton_op_forward(q, k, v, coords, sample, 0.25, True))
        rows += analyse(case + " bwd", dict(fwd_in, grad_out=go, out=out, lse=lse),
                        lambda: ca._triton_op_backward(go, q, k, v, coords, out, lse, sample, 0.25, True))
logits = torch.randn(2, 3, 6, 5)
for from_landmarks, data in ((True, torch.rand(2, 3, 2) * 5), (False, torch.rand(2, 3, 6, 5))):
    case = "central loss " + ("from landmarks" if from_landmarks else "from a target")
    for reduction in ("mean", "none"):
        args = (logits, data, 2.0, 2.0, reduction, None, from_landmarks)
        inputs = dict(logits=logits, data=data)
        rows += analyse(f"{case} {reduction} fwd", inputs, lambda: cl._triton_op_forward(*args))
        grad = torch.ones(()) if reduction == "mean" else torch.ones(logits.shape)
        rows += analyse(f"{case} {reduction} bwd", dict(inputs, grad_output=grad),
                        lambda: cl._triton_op_backward(grad, *args))
print(json.dumps(rows))
'''


def _analysis(mode: str) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = str(REPO_ROOT)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, mode], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def traced_rows():
    return _analysis("traced")


def test_no_kernel_writes_an_op_input_when_traced(traced_rows):
    kernels = {row["kernel"] for row in traced_rows}
    # Every kernel of both ops was analysed (the backward's scatter among them) ...
    assert {"_sample_kernel", "_attn_fwd_kernel", "_attn_bwd_dkv_kernel", "_attn_bwd_dq_kernel",
            "_row_dot_kernel", "_scatter_kernel", "_central_loss_kernel"} <= kernels
    # ... each writes something (an analysis that gave up would list every input) ...
    assert all(row["written"] for row in traced_rows)
    # ... and none an input of its op, which functionalization would copy back into the caller's tensor.
    assert [row for row in traced_rows if row["inputs_written"]] == []


def test_the_check_sees_the_scatter_writing_coords_untraced():
    """Without the copy made while traced, the scatter's atomics (addresses from the loaded
    coordinates) count as writing the coordinates: the check above can fail."""
    rows = [row for row in _analysis("eager") if row["kernel"] == "_scatter_kernel"]
    assert rows and all(row["inputs_written"] == ["coords"] for row in rows)
