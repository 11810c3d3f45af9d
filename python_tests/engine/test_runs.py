"""The run folder's state helpers: atomic writes and JSON (``coorkern.engine.files``), checkpoints and RNG state
(``coorkern.engine.checkpoints``)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from coorkern.engine import checkpoints, files


def test_atomic_write_goes_through_a_hidden_temporary_file_next_to_the_target(tmp_path, monkeypatch):
    target = tmp_path / "new" / "nested" / "metrics.json"  # missing parents are created
    seen = []

    def write(f):
        seen.extend(target.parent.iterdir())  # the temporary file, while it is written
        f.write(b"payload")

    replaced = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: replaced.append((Path(src), Path(dst))) or real_replace(src, dst))
    old = os.umask(0o022)
    try:
        assert files.atomic_write(target, write) == target
    finally:
        os.umask(old)
    (tmp,) = seen
    assert replaced == [(tmp, target)]
    assert tmp.parent == target.parent and tmp.name.startswith(".metrics.json.") and tmp.name.endswith(".tmp")
    assert target.read_bytes() == b"payload" and not tmp.exists()
    assert target.stat().st_mode & 0o777 == 0o644  # a normal file's mode under the umask, not mkstemp's 0600


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "checkpoint_last.pt"
    target.write_bytes(b"old")

    def fail(f):
        f.write(b"half")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError, match="killed mid-write"):
        files.atomic_write(target, fail)
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["checkpoint_last.pt"]


def test_write_json_is_indented_in_insertion_order_and_converts_tensors_paths_and_numpy(tmp_path):
    path = files.write_json(tmp_path / "m.json", {"zeta": (1, 2), "alpha": {"t": torch.tensor([0.5, 1.5]),
                                                                         "p": Path("/a/b"), "n": np.float32(0.25)}})
    assert path.read_text() == (
        '{\n  "zeta": [\n    1,\n    2\n  ],\n  "alpha": {\n    "t": [\n      0.5,\n      1.5\n    ],\n'
        '    "p": "/a/b",\n    "n": 0.25\n  }\n}\n')
    with pytest.raises(TypeError, match="not JSON serializable: object"):
        files.write_json(tmp_path / "x.json", {"x": object()})


def _config(**model):
    return {"model": {"num_landmarks": 2, "base_channels": 4, "transformer": "none", **model},
            "root": Path("/data/isbi"), "image_size": (64, 48)}


def _checkpoint(path, epoch):
    model = checkpoints.build_model(_config()["model"])
    checkpoints.save_checkpoint(path, model=model, config=_config(), epoch=epoch)
    return model


class _Wrapper(torch.nn.Module):
    """What DistributedDataParallel looks like to save_checkpoint: the model under ``.module``."""

    def __init__(self, module):
        super().__init__()
        self.module = module


def test_checkpoint_holds_the_bare_model_its_config_and_the_training_state(tmp_path):
    model = checkpoints.build_model(_config()["model"])
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=64.0)
    for name, wrapped in (("ddp", _Wrapper(model)), ("compiled", torch.compile(model)),
                          ("both", _Wrapper(torch.compile(model)))):
        path = checkpoints.save_checkpoint(tmp_path / f"{name}.pt", model=wrapped, config=_config(), epoch=4,
                                     optimizer=optimizer, scaler=scaler, extra={"best": 0.5})
        ckpt = checkpoints.load_checkpoint(path)
        assert list(ckpt["model"]) == list(model.state_dict()), name  # no "module." / "_orig_mod." prefixes
        assert ckpt["model_config"] == _config()["model"] and ckpt["epoch"] == 4 and ckpt["best"] == 0.5
        assert ckpt["config"]["root"] == "/data/isbi" and ckpt["config"]["image_size"] == [64, 48]
        assert ckpt["scaler"]["scale"] == 64.0 and ckpt["optimizer"]["param_groups"][0]["lr"] == 0.1
    restored = checkpoints.model_from_checkpoint(ckpt)
    assert restored.depths == model.depths and isinstance(restored.depths, tuple)  # JSON lists come back as tuples


def test_load_checkpoint_of_a_run_folder_takes_the_last_then_the_best(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint_last.pt or checkpoint_best.pt in this folder"):
        checkpoints.load_checkpoint(tmp_path)
    _checkpoint(tmp_path / "checkpoint_best.pt", epoch=1)
    assert checkpoints.load_checkpoint(tmp_path)["path"] == str(tmp_path / "checkpoint_best.pt")
    _checkpoint(tmp_path / "checkpoint_last.pt", epoch=2)
    ckpt = checkpoints.load_checkpoint(tmp_path)  # --resume continues from the last epoch
    assert (ckpt["path"], ckpt["epoch"]) == (str(tmp_path / "checkpoint_last.pt"), 2)
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        checkpoints.load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable coorkern checkpoint"):
        checkpoints.load_checkpoint(tmp_path / "junk.pt")
    torch.save({"model": {}}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="missing format tag"):
        checkpoints.load_checkpoint(tmp_path / "foreign.pt")


def test_best_checkpoint_of_a_run_folder_falls_back_to_the_last_and_maps_devices(tmp_path):
    _checkpoint(tmp_path / "checkpoint_last.pt", epoch=3)
    ckpt = checkpoints.load_best_checkpoint(tmp_path)  # no best yet (an interrupted first epoch)
    assert (ckpt["path"], ckpt["epoch"]) == (str(tmp_path / "checkpoint_last.pt"), 3)
    model = _checkpoint(tmp_path / "checkpoint_best.pt", epoch=2)
    ckpt = checkpoints.load_best_checkpoint(tmp_path, map_location="meta")
    assert (ckpt["path"], ckpt["epoch"]) == (str(tmp_path / "checkpoint_best.pt"), 2)
    assert all(t.device.type == "meta" for t in ckpt["model"].values())
    restored = checkpoints.model_from_checkpoint(checkpoints.load_best_checkpoint(tmp_path), device="meta")
    assert not restored.training and all(p.device.type == "meta" for p in restored.parameters())
    restored = checkpoints.model_from_checkpoint(checkpoints.load_best_checkpoint(tmp_path))
    for name, tensor in model.state_dict().items():
        assert torch.equal(restored.state_dict()[name], tensor), name


def test_rng_state_restores_the_cuda_generators_where_there_are_some(monkeypatch):
    restored, cuda_states = [], [torch.arange(4, dtype=torch.uint8)]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: cuda_states)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", restored.append)
    state = checkpoints.rng_state()
    checkpoints.set_rng_state(state)
    assert len(restored) == 1 and restored[0] is cuda_states
    del state["cuda"]  # a checkpoint written without CUDA, resumed on a GPU machine
    checkpoints.set_rng_state(state)
    assert len(restored) == 1
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # and the other way round
    checkpoints.set_rng_state(dict(state, cuda=[torch.arange(4, dtype=torch.uint8)]))
    assert len(restored) == 1


def test_rng_state_keeps_numpys_cached_gaussian():
    """NumPy's legacy generator caches the second value of each Gaussian pair: after an odd
    number of normal draws the state has has_gauss = 1 and the cached value, both restored."""
    np.random.seed(5)
    np.random.standard_normal(3)
    state = checkpoints.rng_state()
    assert state["numpy"][3] == 1
    expected = np.random.standard_normal(4)
    np.random.seed(6)
    checkpoints.set_rng_state(state)
    assert np.array_equal(np.random.standard_normal(4), expected)


class _NotATensor:
    pass


def test_update_checkpoint_loads_weights_only(tmp_path):
    """A checkpoint file holding an arbitrary pickled object is refused, not unpickled."""
    path = tmp_path / "checkpoint_last.pt"
    torch.save({"format": "coorkern-checkpoint-v1", "payload": _NotATensor()}, path)
    with pytest.raises(pickle.UnpicklingError):
        checkpoints.update_checkpoint(path, radii=[1.0])
