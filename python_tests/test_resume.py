"""Resume continues a run exactly: weights, history, the best score so far and the RNG streams,
with augmentation and bf16 autocast on (the paths a plain resume test does not take)."""

import random

import numpy as np
import pytest
import torch

from coorkern import train

pytest.importorskip("PIL.Image")

TINY = ["--image-size", "64", "64", "--train-samples", "8", "--val-samples", "4", "--test-samples", "4",
        "--batch-size", "4", "--base-channels", "2", "--heads", "2", "2", "1", "1", "--no-progress",
        "--threads", "1", "--overlays", "0", "--epochs", "2", "--deterministic", "--augment", "--amp", "bf16"]


def rng_draws():
    """What the next user code would draw from each global generator."""
    return torch.rand(4).tolist(), random.random(), float(np.random.rand())


def strip(history):  # everything but the timings
    return [{k: v for k, v in row.items() if "time" not in k and "images_per_s" not in k} for row in history]


def test_resume_with_augmentation_and_amp_continues_exactly(tmp_path):
    straight = train.main(TINY + ["--out", str(tmp_path / "a")])
    straight_draws = rng_draws()

    train.main(TINY + ["--out", str(tmp_path / "b"), "--stop-after", "1"])
    # Pretend an earlier score was better than anything to come: the resumed run must keep it
    # (and checkpoint_best.pt from epoch 1) instead of starting over from +inf.
    last = tmp_path / "b" / "checkpoint_last.pt"
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["epoch"] == 0 and ckpt["config"]["args"]["augment"] and ckpt["config"]["args"]["amp"] == "bf16"
    ckpt["best"] = -1.0
    torch.save(ckpt, last)
    torch.manual_seed(123)  # the resumed run must restore the generators, not inherit these
    random.seed(123)
    np.random.seed(123)
    resumed = train.main(["--resume", str(last), "--no-progress", "--threads", "1"])

    a, b = straight["model"].state_dict(), resumed["model"].state_dict()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert strip(straight["history"]) == strip(resumed["history"])
    assert rng_draws() == straight_draws
    assert torch.load(last, weights_only=True)["best"] == -1.0
    assert torch.load(tmp_path / "b" / "checkpoint_best.pt", weights_only=True)["epoch"] == 0
    assert torch.load(tmp_path / "a" / "checkpoint_best.pt", weights_only=True)["epoch"] in (0, 1)


def _checkpoint(path, epoch):
    from coorkern import _runs

    config = {"model": {"num_landmarks": 3, "base_channels": 4, "transformer": "none", "heads": [1, 1, 1, 1]}}
    model = _runs.build_model(config["model"])
    _runs.save_checkpoint(path, model=model, config=config, epoch=epoch)
    return model


def test_best_checkpoint_of_a_run_folder_falls_back_to_the_last_and_maps_devices(tmp_path):
    from coorkern import _runs

    _checkpoint(tmp_path / "checkpoint_last.pt", epoch=3)
    ckpt = _runs.load_best_checkpoint(tmp_path)  # no best yet (an interrupted first epoch)
    assert (ckpt["path"], ckpt["epoch"]) == (str(tmp_path / "checkpoint_last.pt"), 3)
    model = _checkpoint(tmp_path / "checkpoint_best.pt", epoch=2)
    ckpt = _runs.load_best_checkpoint(tmp_path, map_location="meta")
    assert (ckpt["path"], ckpt["epoch"]) == (str(tmp_path / "checkpoint_best.pt"), 2)
    assert all(t.device.type == "meta" for t in ckpt["model"].values())
    restored = _runs.model_from_checkpoint(_runs.load_best_checkpoint(tmp_path), device="meta")
    assert not restored.training and all(p.device.type == "meta" for p in restored.parameters())
    restored = _runs.model_from_checkpoint(_runs.load_best_checkpoint(tmp_path))
    for name, tensor in model.state_dict().items():
        assert torch.equal(restored.state_dict()[name], tensor), name


def test_rng_state_restores_the_cuda_generators_where_there_are_some(monkeypatch):
    from coorkern import _runs

    restored, cuda_states = [], [torch.arange(4, dtype=torch.uint8)]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: cuda_states)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", restored.append)
    state = _runs.rng_state()
    _runs.set_rng_state(state)
    assert len(restored) == 1 and restored[0] is cuda_states
    del state["cuda"]  # a checkpoint written without CUDA, resumed on a GPU machine
    _runs.set_rng_state(state)
    assert len(restored) == 1
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # and the other way round
    _runs.set_rng_state(dict(state, cuda=[torch.arange(4, dtype=torch.uint8)]))
    assert len(restored) == 1


def test_rng_state_keeps_numpys_cached_gaussian():
    """NumPy's legacy generator caches the second value of each Gaussian pair: after an odd
    number of normal draws the state has has_gauss = 1 and the cached value, both restored."""
    from coorkern import _runs

    np.random.seed(5)
    np.random.standard_normal(3)
    state = _runs.rng_state()
    assert state["numpy"][3] == 1
    expected = np.random.standard_normal(4)
    np.random.seed(6)
    _runs.set_rng_state(state)
    assert np.array_equal(np.random.standard_normal(4), expected)


class _NotATensor:
    pass


def test_update_checkpoint_loads_weights_only(tmp_path):
    """A checkpoint file holding an arbitrary pickled object is refused, not unpickled."""
    import pickle

    from coorkern import _runs

    path = tmp_path / "checkpoint_last.pt"
    torch.save({"format": "coorkern-checkpoint-v1", "payload": _NotATensor()}, path)
    with pytest.raises(pickle.UnpicklingError):
        _runs.update_checkpoint(path, radii=[1.0])
