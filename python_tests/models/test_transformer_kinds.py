"""The Table IV baselines of coorkern.models: Swin (shifted windows) and deformable (DAT) attention.

Window attention is checked against a naive full-map computation built the textbook
Swin way (padded map, ``img_mask`` regions from slices, windows of the rolled map);
deformable attention against ``coor_attention(sample="kv")``.  Models are test-sized.
"""

from __future__ import annotations

import pytest
import torch

from coorkern import backend as coorkern_backend
from coorkern import models, train
from coorkern.models import CoorDetector, CoorTransformerBlock, TokenAttention, WindowAttention


def tiny(transformer: str, **overrides) -> CoorDetector:
    return CoorDetector(**{"base_channels": 4, "num_landmarks": 3, "heads": (2, 2, 1, 1),
                           "transformer": transformer, **overrides})


def naive_window_attention(attn: WindowAttention, q, k, v, height: int, width: int) -> torch.Tensor:
    """Token-by-token attention over the whole map with Swin's masks; ``(B, heads, N, d)``."""
    ws = attn.window_size
    wh, ww = min(ws, height), min(ws, width)
    sh = wh // 2 if attn.shifted and height > wh else 0
    sw = ww // 2 if attn.shifted and width > ww else 0
    ph, pw = -(-height // wh) * wh, -(-width // ww) * ww

    def region(pos, size, window, shift):  # Swin's img_mask slices on the rolled map
        if shift == 0:
            return 0
        return 0 if pos < size - window else (1 if pos < size - shift else 2)

    cells = [(y, x) for y in range(height) for x in range(width)]
    labels = []
    for y, x in cells:
        r, c = (y - sh) % ph, (x - sw) % pw  # where the roll puts the token
        labels.append((r // wh, c // ww, region(r, ph, wh, sh), region(c, pw, ww, sw)))
    n = len(cells)
    batch, heads, d = q.shape[0], q.shape[1], q.shape[-1]
    qf, kf, vf = (t.reshape(batch, heads, n, d) for t in (q, k, v))
    logits = qf @ kf.transpose(-1, -2) / d ** 0.5
    bias = torch.full((heads, n, n), float("-inf"), dtype=q.dtype)
    for i, (yi, xi) in enumerate(cells):
        for j, (yj, xj) in enumerate(cells):
            if labels[i] == labels[j]:
                bias[:, i, j] = attn.relative_position_bias[(yi - yj + ws - 1) * (2 * ws - 1) + (xi - xj + ws - 1)]
    return torch.softmax(logits + bias, dim=-1) @ vf


@pytest.mark.parametrize("height, width, window, shifted", [
    (16, 16, 8, False), (16, 16, 8, True),   # exact windows
    (13, 10, 4, True), (9, 7, 4, False),     # padded to a multiple of the window
    (5, 3, 8, True),                         # smaller than one window: one window, no shift
    (12, 5, 4, True),                        # shifted along y only (x fits one window)
])
def test_window_attention_matches_naive_swin(height, width, window, shifted):
    torch.manual_seed(height * 31 + width)
    attn = WindowAttention(8, 2, window_size=window, shifted=shifted).double()
    with torch.no_grad():
        attn.relative_position_bias.normal_()  # large enough that a wrong index shows
    q, k, v = (torch.randn(2, 2, height, width, 4, dtype=torch.float64) for _ in range(3))
    got = attn.attend(q, k, v, None)
    torch.testing.assert_close(got, naive_window_attention(attn, q, k, v, height, width))


def test_shifted_windows_differ_and_every_query_keeps_a_key():
    q, k, v = (torch.randn(1, 1, 12, 12, 4) for _ in range(3))
    plain, shifted = WindowAttention(4, 1, 4), WindowAttention(4, 1, 4, shifted=True)
    shifted.relative_position_bias = plain.relative_position_bias
    assert not torch.allclose(plain.attend(q, k, v, None), shifted.attend(q, k, v, None))
    assert plain.layout(10, 10) == (4, 4, 0, 0) and shifted.layout(10, 10) == (4, 4, 2, 2)
    mask = shifted.attention_bias(10, 10)  # padded to 12x12: 9 windows of 16 tokens
    assert mask.shape == (9, 1, 16, 16)
    # Padded queries keep themselves (no all -inf row, whose softmax would be NaN in backward).
    assert torch.isfinite(mask.diagonal(dim1=-2, dim2=-1)).all()
    assert torch.isinf(mask).any(-1).any()  # ... and padded keys are masked for real queries


def test_window_attention_gradients_reach_the_bias_table():
    attn = WindowAttention(8, 2, window_size=4, shifted=True)
    tokens = torch.randn(2, 7 * 9, 8, requires_grad=True)
    out = attn(tokens, 7, 9)
    assert out.shape == tokens.shape
    out.square().sum().backward()
    assert torch.isfinite(tokens.grad).all() and tokens.grad.abs().sum() > 0
    grad = attn.relative_position_bias.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.parametrize("transformer", ["swin", "deformable"])
@pytest.mark.parametrize("size", [(64, 64), (70, 45)])
def test_detector_forward_backward_and_gradients(transformer, size):
    model = tiny(transformer)
    images = torch.randn(2, 1, *size)
    logits = model(images)
    assert logits.shape == (2, 3, *size)
    landmarks = torch.rand(2, 3, 2) * torch.tensor([size[1] - 1.0, size[0] - 1.0])
    train.compute_loss("central", logits, landmarks, sigma=2.0).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert not missing, f"no gradient reached: {missing}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_kinds_build_the_right_attention(monkeypatch):
    def kinds(model):
        return [m.kind for m in model.modules() if isinstance(m, TokenAttention)]

    swin, deformable = tiny("swin", depths=(2, 0, 1, 1)), tiny("deformable")
    assert kinds(swin) == ["swin"] * 4 and kinds(deformable) == ["deformable"] * 4
    # Shifted in every second block of the decoder, counted across stages.
    assert [[b.attn.shifted for b in stage.transformer] for stage in swin.decoder] == [[False, True], [], [False], [True]]
    assert deformable.sample == "kv" and tiny("coor").sample == "qk"

    calls = []
    real = models.attention.coor_attention
    monkeypatch.setattr(models.attention, "coor_attention", lambda *a, **k: calls.append(k["sample"]) or real(*a, **k))
    tiny("swin")(torch.randn(1, 1, 64, 64))
    assert calls == []
    images = torch.randn(1, 1, 64, 64)
    out = deformable(images)
    assert calls == ["kv"] * 4
    # The deformable kind is coor_attention(sample="kv") without positions: same weights, same output.
    released = tiny("coor", sample="kv", position="none")
    released.load_state_dict(deformable.state_dict())
    torch.testing.assert_close(released(images), out)


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="sample='kv'"):
        tiny("deformable", sample="qk")
    with pytest.raises(ValueError, match="transformer"):
        tiny("swinv2")
    with pytest.raises(ValueError, match="window_size"):
        tiny("swin", window_size=0)
    with pytest.raises(TypeError, match="window_size"):
        WindowAttention(8, 2, window_size=2.5)
    with pytest.raises(ValueError, match="attention"):
        CoorTransformerBlock(8, 2, attention="window")
    with pytest.raises(SystemExit):
        train.build_parser().parse_args(["--transformer", "swinv2"])
    for kind in models.TRANSFORMER_KINDS:
        assert train.build_parser().parse_args(["--transformer", kind]).transformer == kind


def test_bf16_autocast_and_summary(capsys):
    model = tiny("swin")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(torch.randn(1, 1, 64, 96))
    assert torch.isfinite(logits.float()).all()
    models._main(["--summary", "--transformer", "swin", "--base-channels", "4", "--window-size", "4"])
    text = capsys.readouterr().out
    assert "transformer='swin'" in text and "4 x 4 token windows" in text
    models._main(["--summary", "--transformer", "deformable", "--base-channels", "4"])
    assert "transformer='deformable'" in capsys.readouterr().out


def test_swin_onnx_export_matches_pytorch(tmp_path):
    """(deformable is coor with sample="kv", whose export test_export.py checks.)"""
    onnx = pytest.importorskip("onnx", reason="needs the 'onnx' package (pip install coorkern[test])")
    pytest.importorskip("onnxscript", reason="torch.onnx.export(dynamo=True) needs 'onnxscript'")
    ort = pytest.importorskip("onnxruntime", reason="needs 'onnxruntime'")
    from coorkern.export import to_onnx

    model = CoorDetector(base_channels=2, num_landmarks=4, transformer="swin").eval()
    path = to_onnx(model, tmp_path / "detector.onnx", (64, 80))
    onnx.checker.check_model(str(path))
    images = torch.randn(1, 1, 64, 80)
    (logits,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"images": images.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(logits), model(images), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("height, width, heads", [(5, 7, 2), (1, 9, 1), (8, 8, 4)])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 5e-5), (torch.float64, 1e-10)])
def test_vanilla_on_cpu_runs_the_fused_kernel_and_equals_sdpa(height, width, heads, dtype, tol, monkeypatch):
    """Plain attention on CPU goes through coor_attention at the token centres; same values and gradients as SDPA."""
    from coorkern.models import attention as attention_mod
    from coorkern.ops._runtime.extension import cpp_available

    if not cpp_available():
        pytest.skip("the C++ extension is not built")
    torch.manual_seed(0)
    layer = TokenAttention(8 * heads, heads).to(dtype)
    tokens = torch.randn(2, height * width, 8 * heads, dtype=dtype, requires_grad=True)
    calls = []
    fused = attention_mod.coor_attention
    monkeypatch.setattr(attention_mod, "coor_attention", lambda *a, **k: calls.append(a[3]) or fused(*a, **k))
    out = layer(tokens, height, width)
    assert len(calls) == 1 and attention_mod.dense_on_fused_kernel(tokens.device)
    (grad,) = torch.autograd.grad(out.square().sum(), tokens)
    with coorkern_backend("reference"):  # the backend switch keeps plain SDPA
        assert not attention_mod.dense_on_fused_kernel(tokens.device)
        expected = layer(tokens, height, width)
    assert len(calls) == 1
    (expected_grad,) = torch.autograd.grad(expected.square().sum(), tokens)
    torch.testing.assert_close(out, expected, atol=tol, rtol=tol)
    torch.testing.assert_close(grad, expected_grad, atol=tol * 10, rtol=tol * 10)
