"""``coorkern.CoorAttention`` with a non-default ``scale`` and ``align_corners``, against an
explicit float64 oracle: bilinear sampling written out (four corners, zero outside the map)
and softmax attention as plain matrix products -- neither grid_sample nor SDPA."""

import pytest
import torch

import coorkern


def sample_bilinear(fmap, coords, align_corners):
    """(B, heads, H, W, d) map at normalized (x, y) coords (B, N, 2) -> (B, heads, N, d)."""
    _, _, height, width, _ = fmap.shape
    x, y = coords[..., 0], coords[..., 1]
    if align_corners:
        px, py = (x + 1) / 2 * (width - 1), (y + 1) / 2 * (height - 1)
    else:
        px, py = ((x + 1) * width - 1) / 2, ((y + 1) * height - 1) / 2
    x0, y0 = px.floor(), py.floor()
    out = 0
    for cx, wx in ((x0, x0 + 1 - px), (x0 + 1, px - x0)):
        for cy, wy in ((y0, y0 + 1 - py), (y0 + 1, py - y0)):
            inside = (cx >= 0) & (cx < width) & (cy >= 0) & (cy < height)
            col, row = cx.clamp(0, width - 1).long(), cy.clamp(0, height - 1).long()
            corner = torch.stack([fmap[b][:, row[b], col[b]] for b in range(fmap.shape[0])])  # (B, heads, N, d)
            out = out + corner * (wx * wy * inside)[:, None, :, None]
    return out


def attention_oracle(q, k, v, coords, sample, scale, align_corners):
    if sample == "qk":
        q, k = sample_bilinear(q, coords, align_corners), sample_bilinear(k, coords, align_corners)
    else:
        k, v = sample_bilinear(k, coords, align_corners), sample_bilinear(v, coords, align_corners)
    return torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1) @ v


@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("sample", ["qk", "kv"])
@pytest.mark.parametrize("align_corners", [False, True])
def test_module_with_scale_and_align_corners_matches_the_explicit_oracle(backend, sample, align_corners):
    torch.manual_seed(3)
    batch, heads, height, width, d = 1, 2, 4, 5, 8
    n = height * width
    maps = [torch.randn(batch, heads, height, width, d, dtype=torch.float64) for _ in range(3)]
    tokens = torch.randn(batch, heads, n, d, dtype=torch.float64)
    q, k, v = (maps[0], maps[1], tokens) if sample == "qk" else (tokens, maps[1], maps[2])
    # Inside the map and up to half a pixel beyond it (corners sampled as zero).
    coords = (torch.rand(batch, n, 2, dtype=torch.float64) * 2.4 - 1.2)
    inputs = [t.clone().requires_grad_(True) for t in (q, k, v, coords)]
    module = coorkern.CoorAttention(sample=sample, scale=0.7, align_corners=align_corners)
    with coorkern.backend(backend):
        out = module(*inputs)
    expected_inputs = [t.clone().requires_grad_(True) for t in (q, k, v, coords)]
    expected = attention_oracle(*expected_inputs, sample, 0.7, align_corners)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    weights = torch.randn_like(expected)
    (out * weights).sum().backward()
    (expected * weights).sum().backward()
    for name, actual, oracle in zip(("q", "k", "v", "coords"), inputs, expected_inputs):
        torch.testing.assert_close(actual.grad, oracle.grad, rtol=1e-8, atol=1e-10, msg=name)
    # The options matter here: the defaults give another result.
    with coorkern.backend(backend):
        default = coorkern.CoorAttention(sample=sample)(q, k, v, coords)
    assert (default - out).abs().max() > 1e-3


def test_module_defaults_and_bad_options():
    module = coorkern.CoorAttention()
    assert (module.sample, module.scale, module.align_corners) == ("qk", None, True)  # the paper's Q/K sampling
    assert repr(coorkern.CoorAttention(sample="kv", scale=0.5, align_corners=False)).endswith(
        "(sample='kv', scale=0.5, align_corners=False)")
    with pytest.raises(ValueError, match=r"^sample must be one of \('qk', 'kv'\), got 'q'"):
        coorkern.CoorAttention(sample="q")
    with pytest.raises(TypeError, match="^scale must be a real number, got str"):
        coorkern.CoorAttention(scale="0.5")
    with pytest.raises(ValueError, match="^scale must be finite"):
        coorkern.CoorAttention(scale=float("inf"))
    with pytest.raises(TypeError, match="^align_corners must be a bool, got int"):
        coorkern.CoorAttention(align_corners=1)
