"""Export of a trained detector in three formats, for programs without the training code.

* ``onnx`` (:func:`to_onnx`): standard ONNX operators only.  The fused coordinate attention
  (``torch.ops.coorkern.coor_attention``), which no ONNX runtime knows, is traced through its
  eager reference (``F.grid_sample`` + ``F.scaled_dot_product_attention``), which the
  exporter lowers to ``GridSample`` + ``MatMul``/``Softmax``.  Output: the logits.
* ``torchscript`` (:func:`to_torchscript`) and ``pt2`` (:func:`to_pt2`, ``torch.export`` +
  an AOTInductor package) keep the fused ops: the graph calls ``torch.ops.coorkern.*``,
  which a libtorch program resolves by loading ``libcoorkern_ops.so`` (CMake target
  ``coorkern::ops``).  On CPU both call the C++ kernels through the dispatcher (Inductor
  emits an extern call for a custom op it cannot lower); on CUDA the ``pt2`` export traces
  the ops' ``triton_op`` so that Inductor compiles the Triton kernels into the package,
  while TorchScript records ATen's ``grid_sample`` + SDPA (the Triton launches are Python).

The two libtorch formats export :class:`DetectorForExport`: a grey image at the model's
input size with intensities as read (``[0, 1]`` for 8-bit files) goes in; per-image
normalization, the network and the heatmap decoding (argmax + sub-pixel refinement of
:func:`coorkern.metrics.decode_heatmaps`) run inside, and ``(coords, confidence, logits)``
come out, coords in the model's pixels.  What stays outside is what
:func:`coorkern.engine.predictor.predict_batch` does around it: the antialiased bilinear
resize to the model's size and the mapping back, ``x_image = (x + 0.5) * W_image / W - 0.5``.
The artefact carries :func:`export_metadata` (an extra file of the TorchScript archive, the
AOTInductor metadata of the package) so that a program can tell a coorkern detector from
any other model and learn its input size.

Every export is checked before it is reported done: the written file is loaded back and
run on a fixed sample, its logits must match the eager model's within
:data:`LOGIT_TOLERANCE` and its landmarks must be the decoding of its own logits within
:data:`COORD_TOLERANCE_PX`; otherwise the file is deleted and :class:`ExportMismatchError`
raised.  A combination that cannot work here raises :class:`ExportUnsupportedError` naming
what is missing.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from typing import Callable, Optional, Sequence, Union

import torch

from .. import data as data_mod
from .. import metrics
from ..ops._runtime import extension as _extension
from ..ops._runtime.backend import backend

__all__ = ["FORMATS", "DEFAULT_OPSET", "ARTEFACT_FORMAT", "METADATA_FILE", "LOGIT_TOLERANCE", "COORD_TOLERANCE_PX",
           "ExportUnsupportedError", "ExportMismatchError", "DetectorForExport", "export_metadata", "to_onnx",
           "onnx_op_types", "to_torchscript", "to_pt2", "export_model", "pt2_unsupported_reason", "coorkern_ops_in"]

FORMATS = ("onnx", "torchscript", "pt2")
DEFAULT_OPSET = 18  # GridSample needs opset >= 16; 18 is the exporter's well-tested default
ARTEFACT_FORMAT = "coorkern-detector-v1"  # the metadata tag a program checks
METADATA_FILE = "coorkern.txt"  # in a TorchScript archive: the metadata as KEY=VALUE lines
# |exported - eager| <= atol + rtol * |eager| on the logits: Inductor may fuse and reorder float32 arithmetic.
LOGIT_TOLERANCE = {"atol": 1e-4, "rtol": 1e-4}
COORD_TOLERANCE_PX = 0.01  # the artefact's landmarks against decode_heatmaps of its own logits

PathLike = Union[str, os.PathLike]


class ExportUnsupportedError(RuntimeError):
    """The requested export cannot be made with this torch, machine or build (the message names what is missing)."""


class ExportMismatchError(RuntimeError):
    """The exported model, loaded back, disagrees with the eager model on the check sample."""


class DetectorForExport(torch.nn.Module):
    """``image (B, C, H, W)`` at the model's input size, intensities as read -> ``(coords (B, L, 2) (x, y)
    in the model's pixels, confidence (B, L), logits (B, L, H, W))``."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor):
        logits = self.model(data_mod.normalize(image))
        coords, confidence = metrics.decode_heatmaps(logits)
        return coords, confidence, logits


def export_metadata(model: torch.nn.Module, image_size: Sequence[int], device: torch.device, batch_size: int,
                    fmt: str) -> dict[str, str]:
    """What a program needs to know about the artefact, as strings (AOTInductor metadata is string -> string)."""
    height, width = image_size
    return {
        "coorkern_format": ARTEFACT_FORMAT,
        "export_format": fmt,
        "batch_size": str(batch_size),
        "in_channels": str(getattr(model, "in_channels", 1)),
        "image_height": str(height),
        "image_width": str(width),
        "num_landmarks": str(getattr(model, "num_landmarks", 0)),
        "device": device.type,
        "outputs": "coords,confidence,logits",
    }


def _image_size(image_size: Sequence[int]) -> tuple[int, int]:
    if len(image_size) != 2:
        raise ValueError(f"image_size must be (H, W), got {tuple(image_size)!r}")
    height, width = (int(s) for s in image_size)
    if height < 1 or width < 1:
        raise ValueError(f"image_size must be positive, got {(height, width)!r}")
    return height, width


def _example(model: torch.nn.Module, image_size, batch_size: int, device=None, *, seed: Optional[int] = None):
    """An input of the export's shape: zeros for tracing, a seeded uniform image for the check."""
    height, width = _image_size(image_size)
    try:
        param = next(model.parameters())
        device, dtype = device or param.device, param.dtype
    except StopIteration:
        device, dtype = device or torch.device("cpu"), torch.float32
    shape = (batch_size, getattr(model, "in_channels", 1), height, width)
    if seed is None:
        return torch.zeros(shape, device=device, dtype=dtype)
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=generator, dtype=dtype).to(device)


@contextlib.contextmanager
def _quiet_tracing():
    """Tracing warns at every shape check of the model (the shapes are fixed by design) and torch 2.13
    deprecates TorchScript on each save/load; the export says what it made instead."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated", category=DeprecationWarning)
        yield


class _EvalMode:
    """``with _EvalMode(model):`` eval mode inside, the caller's mode restored afterwards."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.was_training = model, model.training

    def __enter__(self):
        self.model.eval()
        return self.model

    def __exit__(self, *exc) -> None:
        self.model.train(self.was_training)


# ---------------------------------------------------------------------------
# ONNX: standard operators only


def to_onnx(
    model: torch.nn.Module,
    path: PathLike,
    image_size: Sequence[int],
    *,
    batch_size: int = 1,
    opset_version: int = DEFAULT_OPSET,
) -> str:
    """Export ``model`` (for inference, in eval mode) to the ONNX file ``path``; return the path.

    ``image_size`` is ``(H, W)``; the graph has a fixed input of shape
    ``(batch_size, model.in_channels, H, W)`` named ``images`` and one output ``logits``.
    The model's training mode is restored afterwards.
    """
    example = _example(model, image_size, batch_size)
    with _EvalMode(model):
        # The reference backend turns each fused op into grid_sample + SDPA while tracing.
        with backend("reference"), torch.no_grad():
            program = torch.onnx.export(model, (example,), dynamo=True, opset_version=opset_version,
                                        input_names=["images"], output_names=["logits"], verbose=False)
        program.save(os.fspath(path))
    return os.fspath(path)


def onnx_op_types(path: PathLike) -> set[str]:
    """The set of ONNX operator types in the file's graph, including nested functions."""
    import onnx

    proto = onnx.load(os.fspath(path))
    ops = {node.op_type for node in proto.graph.node}
    for function in proto.functions:
        ops.update(node.op_type for node in function.node)
    return ops


# ---------------------------------------------------------------------------
# TorchScript and pt2: the fused ops kept


def _fused_backend(device: torch.device, fmt: str) -> str:
    """The backend to trace with so that the graph calls the fused ops; raises what is missing."""
    if device.type == "cpu":
        if not _extension.cpp_available():
            raise ExportUnsupportedError(
                f"--format {fmt} keeps torch.ops.coorkern.* in the graph, whose CPU kernels are in "
                f"libcoorkern_ops.so, and the C++ library is not loaded ({_extension.load_error()}): build it with "
                "`pip install --no-build-isolation -e .`, or use --format onnx (standard operators only)")
        return "cpp"
    if device.type != "cuda":
        raise ExportUnsupportedError(f"--format {fmt} exports for cpu or cuda, not {device.type}")
    if fmt == "torchscript":
        return "auto"  # grid_sample + SDPA: the Triton kernels' Python launches cannot be scripted
    from ..ops._runtime.host import HAS_TRITON_OP

    if not HAS_TRITON_OP:
        raise ExportUnsupportedError(
            f"--format pt2 on CUDA needs torch.library.triton_op (torch >= 2.6) so that Inductor compiles the "
            f"Triton kernels into the package; this torch is {torch.__version__}: use --format torchscript")
    return "triton"


def coorkern_ops_in(graph_targets: Sequence[str]) -> list[str]:
    """The coorkern ops among ``graph_targets`` (node kinds or targets as strings), in order, without repeats."""
    return list(dict.fromkeys(t for t in graph_targets if t.startswith(("coorkern::", "coorkern."))))


def pt2_unsupported_reason(device: torch.device) -> Optional[str]:
    """Why ``--format pt2`` cannot be made here (None when it can): the torch API, a C++ compiler on CPU."""
    if not hasattr(torch, "export") or not hasattr(torch._inductor, "aoti_compile_and_package"):
        return (f"--format pt2 needs torch.export and AOTInductor packaging "
                f"(torch._inductor.aoti_compile_and_package, torch >= 2.6); this torch is {torch.__version__}: "
                "use --format torchscript")
    if device.type == "cpu":
        try:
            from torch._inductor.cpp_builder import get_cpp_compiler

            get_cpp_compiler()
        except Exception as exc:  # InvalidCxxCompiler, or a torch without cpp_builder
            return (f"--format pt2 on CPU compiles C++ at export time and no C++ compiler was found ({exc}): "
                    "install g++ or clang++, or set CXX; or use --format torchscript")
    return None


def _check(run: Callable, wrapper: DetectorForExport, sample: torch.Tensor, path: PathLike) -> dict:
    """Run the artefact ``run`` loaded from ``path`` and the eager ``wrapper`` on ``sample``; on a mismatch,
    delete the file (nothing unusable is left behind) and raise."""
    try:
        return _compare(run, wrapper, sample, f"export {os.fspath(path)}")
    except ExportMismatchError:
        os.remove(path)
        raise


def _compare(run: Callable, wrapper: DetectorForExport, sample: torch.Tensor, what: str) -> dict:
    with torch.no_grad():
        _, _, expected = wrapper(sample)
        coords, confidence, logits = run(sample)
        own_coords, own_confidence = metrics.decode_heatmaps(logits)
    logit_error = (logits.float() - expected.float()).abs()
    limit = LOGIT_TOLERANCE["atol"] + LOGIT_TOLERANCE["rtol"] * expected.float().abs()
    coord_error = float((coords - own_coords).abs().max())
    confidence_error = float((confidence - own_confidence).abs().max())
    report = {"max_logit_error": float(logit_error.max()), "max_coord_error_px": coord_error}
    if logits.shape != expected.shape or not bool((logit_error <= limit).all()):
        raise ExportMismatchError(
            f"{what}: the exported model's logits differ from the eager model's on the check sample "
            f"(max |difference| {report['max_logit_error']:.3g}, allowed {LOGIT_TOLERANCE['atol']} + "
            f"{LOGIT_TOLERANCE['rtol']} * |eager|); the file was deleted")
    if not coord_error <= COORD_TOLERANCE_PX or not confidence_error <= 1e-4:
        raise ExportMismatchError(
            f"{what}: the exported model's landmarks are not the decoding of its logits on the check sample "
            f"(max |difference| {coord_error:.3g} px, confidence {confidence_error:.3g}); the file was deleted")
    return report


def to_torchscript(model: torch.nn.Module, path: PathLike, image_size: Sequence[int], *, batch_size: int = 1,
                   device: Union[str, torch.device, None] = None) -> dict:
    """Trace :class:`DetectorForExport` of ``model`` into the TorchScript file ``path``, check it; return a report.

    The report: ``path``, ``coorkern_ops`` (the fused ops the graph calls), ``metadata``, the check's errors.
    """
    device = torch.device(device) if device is not None else _example(model, image_size, 1).device
    fused = _fused_backend(device, "torchscript")
    example = _example(model, image_size, batch_size, device)
    metadata = export_metadata(model, image_size, device, batch_size, "torchscript")
    with _EvalMode(model), backend(fused), torch.no_grad(), _quiet_tracing():
        wrapper = DetectorForExport(model.to(device)).eval()
        traced = torch.jit.trace(wrapper, (example,), check_trace=False)
        ops = coorkern_ops_in([node.kind() for node in traced.inlined_graph.nodes()])
        torch.jit.save(traced, os.fspath(path),
                       _extra_files={METADATA_FILE: "".join(f"{k}={v}\n" for k, v in metadata.items())})
        loaded = torch.jit.load(os.fspath(path), map_location=device)
        report = _check(loaded, wrapper, _example(model, image_size, batch_size, device, seed=0), path)
    return {"path": os.fspath(path), "coorkern_ops": ops, "metadata": metadata, **report}


def _pt2_configs(metadata: dict) -> dict:
    """Inductor options of the package.  ``cpp.dynamic_threads``: by default Inductor sizes the CPU
    kernels' per-thread reduction buffers for the exporting process's thread count and, where that
    equals the core count, leaves the team size to OpenMP at run time -- so a package exported on
    a 2-core machine and run with more threads would write past those buffers.  Sized at run time
    (``omp_get_max_threads()``), the package follows the runner's ``at::set_num_threads``."""
    return {"aot_inductor.metadata": metadata, "cpp.dynamic_threads": True}


def to_pt2(model: torch.nn.Module, path: PathLike, image_size: Sequence[int], *, batch_size: int = 1,
           device: Union[str, torch.device, None] = None) -> dict:
    """``torch.export`` :class:`DetectorForExport` of ``model`` and package it with AOTInductor at ``path``
    (compiles C++, and Triton on CUDA: a minute or more); check it; return a report as :func:`to_torchscript`."""
    device = torch.device(device) if device is not None else _example(model, image_size, 1).device
    reason = pt2_unsupported_reason(device)
    if reason:
        raise ExportUnsupportedError(reason)
    fused = _fused_backend(device, "pt2")
    example = _example(model, image_size, batch_size, device)
    metadata = export_metadata(model, image_size, device, batch_size, "pt2")
    with _EvalMode(model), backend(fused):
        wrapper = DetectorForExport(model.to(device)).eval()
        program = torch.export.export(wrapper, (example,))
        ops = coorkern_ops_in([str(node.target) for node in program.graph.nodes if node.op == "call_function"])
        written = torch._inductor.aoti_compile_and_package(program, package_path=os.fspath(path),
                                                           inductor_configs=_pt2_configs(metadata))
        loaded = torch._inductor.aoti_load_package(written)
        report = _check(loaded, wrapper, _example(model, image_size, batch_size, device, seed=0), written)
    return {"path": os.fspath(written), "coorkern_ops": ops, "metadata": metadata, **report}


def export_model(model: torch.nn.Module, path: PathLike, fmt: str, image_size: Sequence[int], *,
                 batch_size: int = 1, device: Union[str, torch.device, None] = None,
                 opset_version: int = DEFAULT_OPSET) -> dict:
    """Export in ``fmt`` (one of :data:`FORMATS`); return the report (for ONNX: ``path`` only)."""
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if device is not None and torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ExportUnsupportedError("exporting for cuda needs a CUDA device, and torch sees none here")
    if device is not None:
        model = model.to(device)
    if fmt == "onnx":
        return {"path": to_onnx(model, path, image_size, batch_size=batch_size, opset_version=opset_version)}
    export = to_torchscript if fmt == "torchscript" else to_pt2
    return export(model, path, image_size, batch_size=batch_size, device=device)

