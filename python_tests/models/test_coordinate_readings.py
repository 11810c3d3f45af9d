"""Readings of the paper's coordinate module as options of CoordinateModule / CoorDetector.

Each option builds, trains a step on both CPU backends of the fused op (C++ and the eager
reference) with gradients reaching what it adds; the coordinate-index positions are read
back at the sampling coordinate (exactly for the linear embedding); the options are
validated by name, applied by ``param_groups`` and kept in the config a checkpoint
rebuilds the model from.  Models are test-sized.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

import coorkern
from coorkern.models import (CoordinateModule, CoorDetector, CoorTransformerBlock, GridPosition, TokenAttention,
                             reference_grid, sincos_2d, tokens_to_map)
from coorkern.models.positions import FOURIER_FREQUENCIES, fourier_features


def tiny(**overrides) -> CoorDetector:
    return CoorDetector(**{"base_channels": 2, "num_landmarks": 3, **overrides})


def randomize_positions(model: torch.nn.Module) -> None:
    """Learned positions start at zero (the model without them); give them weights that show."""
    for module in model.modules():
        if isinstance(module, GridPosition):
            torch.nn.init.normal_(module.proj.weight, std=0.5)


class FixedCoordinates(torch.nn.Module):
    """Stands in for a CoordinateModule: always the given ``(B, N, 2)`` coordinates."""

    source = "features"

    def __init__(self, coords: torch.Tensor) -> None:
        super().__init__()
        self.coords = coords

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.coords


def coordinate_modules(model):
    return [m for m in model.modules() if isinstance(m, CoordinateModule)]


READINGS = {
    "default": dict(),
    "offset": dict(position="none"),
    "linear": dict(position="linear"),
    "fourier": dict(position="fourier"),
    "moving": dict(offset_range=1.0, offset_init_std=0.1),
    "queries": dict(coord_source="queries"),
    "groups": dict(coord_groups=2),
    "lr_mult": dict(coord_lr_mult=0.1),
    "deformable": dict(transformer="deformable", position="linear", coord_source="queries"),
    "vanilla_sincos": dict(transformer="vanilla", vanilla_position="sincos"),
}


@pytest.mark.parametrize("name", list(READINGS))
def test_reading_trains_a_step_on_both_cpu_backends(name):
    torch.manual_seed(0)
    model = tiny(**READINGS[name])
    randomize_positions(model)
    images = torch.randn(1, 1, 64, 64)
    results = {}
    for backend in ("cpp", "reference"):
        model.zero_grad()
        with coorkern.backend(backend):
            logits = model(images)
            logits.square().mean().backward()
        assert logits.shape == (1, 3, 64, 64) and torch.isfinite(logits).all()
        results[backend] = (logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    torch.testing.assert_close(results["cpp"][0], results["reference"][0], atol=1e-5, rtol=1e-4)
    grads = results["cpp"][1]
    for n, g in grads.items():
        torch.testing.assert_close(g, results["reference"][1][n], atol=1e-5, rtol=1e-3, msg=n)
    if model.transformer == "vanilla":
        assert not coordinate_modules(model)
        return
    # The coordinate heads and the learned positions get gradients.
    heads = [n for n in grads if n.endswith("coordinates.to_coords.weight")]
    positions = [n for n in grads if ".position." in n]
    assert len(heads) == 4 and len(positions) == (4 if model.position != "none" else 0)
    for n in heads + positions:
        assert grads[n].abs().sum() > 0, n


def test_readings_default_to_the_offset_model_with_fourier_positions():
    model = tiny()
    assert (model.coord_mode, model.position, model.coord_source, model.vanilla_position) == (
        "offset", "fourier", "features", "none")
    assert all(m.attn.position is not None for stage in model.decoder for m in stage.transformer)
    assert [m.groups for m in coordinate_modules(model)] == [1, 1, 1, 1]
    # The position default is the kind's: the deformable (DAT) and the other kinds have none.
    for kind in ("deformable", "vanilla", "swin", "none"):
        assert tiny(transformer=kind).position == "none", kind
    assert tiny(position="none").position == "none"



# --------------------------------------------------------------------------- coordinate-index features


def test_bilinear_sampling_reproduces_a_linear_function_of_position():
    """Sampling the map W p + b at a coordinate c inside it gives W c + b (align_corners=True)."""
    torch.manual_seed(1)
    height, width = 5, 7
    weight, bias = torch.randn(3, 2, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    grid = reference_grid(height, width, dtype=torch.float64)
    fmap = (grid @ weight.T + bias).T.reshape(1, 3, height, width)
    coords = torch.rand(1, 1, 50, 2, dtype=torch.float64) * 2 - 1
    sampled = F.grid_sample(fmap, coords, mode="bilinear", align_corners=True)[0, :, 0].T
    torch.testing.assert_close(sampled, coords[0, 0] @ weight.T + bias)


@pytest.mark.parametrize("backend", ["cpp", "reference"])
@pytest.mark.parametrize("sample", ["qk", "kv"])
def test_linear_position_is_read_back_at_the_sampling_coordinate(backend, sample):
    """TokenAttention(position="linear") = attention of the sampled Q/K plus W_q c / W_k c.

    The eager expectation adds the embedding of the *sampling coordinate* after sampling
    (sample="kv": Q is not sampled and gets that of its own grid point); the module adds the
    embedding of the grid to the maps before the fused op samples them.
    """
    torch.manual_seed(2)
    dim, heads, height, width = 8, 2, 5, 6
    d = dim // heads
    # Coordinates inside the map (where the identity is exact; the op's zero padding fades it outside).
    coords = torch.rand(2, height * width, 2, dtype=torch.float64) * 2 - 1
    attn = TokenAttention(dim, heads, sample, FixedCoordinates(coords), position="linear").double()
    torch.nn.init.normal_(attn.position.proj.weight)
    tokens = torch.randn(2, height * width, dim, dtype=torch.float64)
    with coorkern.backend(backend):
        actual = attn(tokens, height, width)

    q, k, v = attn.qkv(tokens).chunk(3, dim=-1)
    w_q, w_k = attn.position.proj.weight.chunk(2, dim=0)

    def sampled(t):  # tokens (B, N, dim) as a map, read at coords -> (B, N, dim)
        return F.grid_sample(tokens_to_map(t, height, width), coords[:, None], align_corners=True)[:, :, 0].transpose(1, 2)

    grid = reference_grid(height, width, dtype=torch.float64)
    q_s = sampled(q) + coords @ w_q.T if sample == "qk" else q + grid @ w_q.T
    k_s = sampled(k) + coords @ w_k.T
    v_s = v if sample == "qk" else sampled(v)
    split = [t.reshape(2, -1, heads, d).transpose(1, 2) for t in (q_s, k_s, v_s)]
    expected = attn.proj(F.scaled_dot_product_attention(*split).transpose(1, 2).reshape(2, -1, dim))
    torch.testing.assert_close(actual, expected)


def test_fourier_position_is_sampled_approximately():
    """Bilinear interpolation of the Fourier features is within (w h)^2 / 8 of their value at c, not exact."""
    torch.manual_seed(3)
    height, width = 26, 32
    fmap = fourier_features(reference_grid(height, width, dtype=torch.float64)).T.reshape(1, -1, height, width)
    coords = torch.rand(1, 1, 200, 2, dtype=torch.float64) * 2 - 1
    sampled = F.grid_sample(fmap, coords, align_corners=True)[0, :, 0].T
    exact = fourier_features(coords[0, 0])
    h = 2.0 / (min(height, width) - 1)
    error = (sampled - exact).abs()
    assert error.max() <= (max(FOURIER_FREQUENCIES) * h) ** 2 / 8
    assert error.max() > 1e-4
    bands = len(FOURIER_FREQUENCIES)  # columns: per axis, the sines then the cosines of every band
    lowest = error[:, [0, bands, 2 * bands, 3 * bands]]
    assert lowest.max() <= (FOURIER_FREQUENCIES[0] * h) ** 2 / 8  # far closer


def test_learned_positions_start_as_the_model_without_them():
    torch.manual_seed(4)
    plain = tiny(position="none")
    images = torch.randn(1, 1, 64, 64)
    for position in ("linear", "fourier"):
        model = tiny(position=position)
        missing, unexpected = model.load_state_dict(plain.state_dict(), strict=False)
        assert not unexpected and missing and all(".attn.position.proj." in n for n in missing)
        torch.testing.assert_close(model(images), plain(images))
        randomize_positions(model)
        assert not torch.allclose(model(images), plain(images))


def test_sincos_2d_is_the_standard_encoding():
    pe = sincos_2d(3, 4, 10)  # 10 channels: two frequencies per quarter, two left over
    assert pe.shape == (12, 10)
    row, col = 2, 3
    token = pe[row * 4 + col]
    w = torch.tensor([1.0, 1e-2])  # 10000 ** (-i / 2)
    expected = torch.cat((torch.sin(col * w), torch.cos(col * w), torch.sin(row * w), torch.cos(row * w), torch.zeros(2)))
    torch.testing.assert_close(token, expected)


def test_vanilla_sincos_adds_the_encoding_to_queries_and_keys_only():
    torch.manual_seed(5)
    dim, heads, height, width = 8, 2, 3, 4
    attn = TokenAttention(dim, heads, position="sincos")
    tokens = torch.randn(1, height * width, dim)
    actual = attn(tokens, height, width)
    pe = sincos_2d(height, width, dim)
    q = F.linear(tokens + pe, attn.qkv.weight[:dim], attn.qkv.bias[:dim])
    k = F.linear(tokens + pe, attn.qkv.weight[dim:2 * dim], attn.qkv.bias[dim:2 * dim])
    v = F.linear(tokens, attn.qkv.weight[2 * dim:], attn.qkv.bias[2 * dim:])
    split = [t.reshape(1, -1, heads, dim // heads).transpose(1, 2) for t in (q, k, v)]
    expected = attn.proj(F.scaled_dot_product_attention(*split).transpose(1, 2).reshape(1, -1, dim))
    torch.testing.assert_close(actual, expected)
    assert not any(True for _ in attn.position.parameters())  # fixed, nothing learned


@pytest.mark.parametrize("overrides", [dict(position="linear"), dict(transformer="vanilla", vanilla_position="sincos")])
def test_positions_under_bf16_autocast(overrides):
    model = tiny(**overrides)
    randomize_positions(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(torch.randn(1, 1, 64, 64))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()


# --------------------------------------------------------------------------- offsets that can move


def test_offset_init_std_sets_where_the_points_start():
    x = torch.randn(2, 8, 6, 5)
    grid = reference_grid(6, 5)
    torch.manual_seed(6)
    assert torch.equal(CoordinateModule(8, offset_init_std=0.0)(x), grid.expand(2, -1, -1))
    spreads = []
    for std in (1e-2, 1.0):
        torch.manual_seed(6)
        spreads.append(float((CoordinateModule(8, offset_init_std=std)(x) - grid).abs().mean().detach()))
    assert spreads[1] > 10 * spreads[0] > 0


def test_coordinates_predicted_from_the_queries():
    torch.manual_seed(7)
    dim, heads, height, width = 8, 2, 4, 3
    attn = TokenAttention(dim, heads, "qk", CoordinateModule(dim, heads, source="queries"))
    seen = []
    attn.coordinates.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0]))
    tokens = torch.randn(2, height * width, dim)
    attn(tokens, height, width)
    queries = tokens_to_map(attn.qkv(tokens)[..., :dim], height, width)
    torch.testing.assert_close(seen[0], queries)
    attn.coordinates.source = "features"
    attn(tokens, height, width)
    torch.testing.assert_close(seen[1], tokens_to_map(tokens, height, width))


def test_coord_groups_per_stage():
    model = tiny(coord_groups=2)
    assert [m.groups for m in coordinate_modules(model)] == [2, 2, 2, 1]  # heads (8, 4, 2, 1)
    per_head = tiny(coord_groups=8)
    assert [m.groups for m in coordinate_modules(per_head)] == [8, 4, 2, 1]
    block = CoorTransformerBlock(8, 4, coord_groups=2)
    seen = []
    block.attn.coordinates.register_forward_hook(lambda module, inputs, output: seen.append(output))
    block(torch.randn(1, 8, 4, 4))
    coords = seen[0]
    assert coords.shape == (1, 4, 16, 2)
    assert torch.equal(coords[:, 0], coords[:, 1]) and not torch.equal(coords[:, 1], coords[:, 2])


def test_param_groups_apply_the_coordinate_learning_rate_multiplier():
    model = tiny(coord_lr_mult=0.1)
    groups = model.param_groups(1e-3)
    assert [g["name"] for g in groups] == ["model", "coordinates"]
    assert [g["lr_mult"] for g in groups] == [1.0, 0.1]
    assert groups[0]["lr"] == 1e-3 and groups[1]["lr"] == pytest.approx(1e-4)
    coordinate = {id(p) for m in coordinate_modules(model) for p in m.parameters()}
    assert {id(p) for p in groups[1]["params"]} == coordinate
    assert not coordinate & {id(p) for p in groups[0]["params"]}
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == len(list(model.parameters()))

    # The multiplier is what the optimizer applies: 0 freezes the coordinate modules.
    frozen = tiny(coord_lr_mult=0.0)
    optimizer = torch.optim.Adam(frozen.param_groups(1e-2))
    before = {n: p.detach().clone() for n, p in frozen.named_parameters()}
    frozen(torch.randn(1, 1, 64, 64)).square().mean().backward()
    optimizer.step()
    for n, p in frozen.named_parameters():
        assert torch.equal(p, before[n]) == (".coordinates." in n), n

    # One group of model.parameters() when nothing is scaled, so saved optimizer states still load.
    for model in (tiny(), tiny(transformer="vanilla", coord_lr_mult=0.1)):
        (group,) = model.param_groups(2e-3)
        assert group["lr"] == 2e-3 and group["params"] == list(model.parameters())


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize("overrides, error, match", [
    (dict(coord_mode="relative"), ValueError, "^coord_mode must be one of"),
    (dict(position="learned"), ValueError, "^position must be one of"),
    (dict(position="sincos"), ValueError, "^position must be one of"),
    (dict(vanilla_position="linear"), ValueError, "^vanilla_position must be one of"),
    (dict(offset_range=-1.0), ValueError, "^offset_range must be >= 0"),
    (dict(offset_init_std=-0.1), ValueError, "^offset_init_std must be >= 0"),
    (dict(offset_init_std="wide"), TypeError, "^offset_init_std must be a real number"),
    (dict(coord_lr_mult=-1.0), ValueError, "^coord_lr_mult must be >= 0"),
    (dict(coord_lr_mult=math.nan), ValueError, "^coord_lr_mult must be finite"),
    (dict(coord_source="keys"), ValueError, "^coord_source must be one of"),
    (dict(coord_groups=0), ValueError, "^coord_groups must be >= 1"),
    (dict(coord_groups=3), ValueError, r"^coord_groups \(3\) must divide"),
    (dict(transformer="vanilla", coord_mode="relative"), ValueError, "^coord_mode"),  # refused for every kind
    (dict(transformer="swin", vanilla_position="learned"), ValueError, "^vanilla_position"),
])
def test_bad_options_name_the_argument(overrides, error, match):
    with pytest.raises(error, match=match):
        tiny(**overrides)


def test_bad_block_and_module_options_name_the_argument():
    with pytest.raises(ValueError, match="^position must be 'none' for attention 'swin'"):
        CoorTransformerBlock(8, 2, attention="swin", position="linear")
    with pytest.raises(ValueError, match=r"^coord_groups \(3\) must divide heads \(4\)"):
        CoorTransformerBlock(8, 4, coord_groups=3)
    with pytest.raises(ValueError, match="^coord_source must be one of"):
        CoorTransformerBlock(8, 2, coord_source="keys")
    with pytest.raises(ValueError, match="^position must be one of"):
        TokenAttention(8, 2, position="rotary")
    with pytest.raises(ValueError, match="^source must be one of"):
        CoordinateModule(8, source="keys")
    with pytest.raises(ValueError, match="^lr must be >= 0"):
        tiny().param_groups(-1.0)


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize("name", ["offset", "linear", "fourier", "moving", "queries", "groups", "lr_mult",
                                  "deformable", "vanilla_sincos"])
def test_config_rebuilds_the_same_model(name):
    from coorkern.engine.checkpoints import model_from_checkpoint

    torch.manual_seed(8)
    model = tiny(**READINGS[name])
    randomize_positions(model)
    config = json.loads(json.dumps(model.config))  # what a run's config and checkpoint hold
    for key, value in READINGS[name].items():
        assert config[key] == value
    rebuilt = model_from_checkpoint({"model_config": config, "model": model.state_dict()})
    assert rebuilt.config == config
    images = torch.randn(1, 1, 64, 64)
    torch.testing.assert_close(rebuilt(images), model.eval()(images))


def test_config_without_the_reading_keys_gets_the_defaults():
    """The model_config of a checkpoint written before these options existed still loads."""
    from coorkern.engine.checkpoints import model_from_checkpoint

    old = dict(in_channels=1, num_landmarks=3, base_channels=2, depths=[1, 1, 1, 1], heads=[8, 4, 2, 1],
               mlp_ratio=4.0, transformer="coor")
    # Such a model had no positions, though today's default for coor is the Fourier one.
    model = model_from_checkpoint({"model_config": old, "model": tiny(position="none").state_dict()})
    assert model.config == tiny(position="none").config and tiny().position == "fourier"
