"""Two-process DistributedDataParallel training with gloo on CPU (what torchrun sets up)."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("PIL.Image")
if not torch.distributed.is_available():  # pragma: no cover
    pytest.skip("torch.distributed is not available", allow_module_level=True)

ARGS = ["--image-size", "64", "64", "--train-samples", "16", "--val-samples", "4", "--test-samples", "4",
        "--epochs", "1", "--base-channels", "4", "--heads", "2", "2", "1", "1", "--no-progress", "--threads", "1",
        "--overlays", "1"]
PER_RANK_BATCH = 4

WORKER = textwrap.dedent(
    """
    import json, sys, torch
    from coorkern import data, train
    rank, tmp, args = int(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
    seen = []  # the training items this rank loads
    load = data.SyntheticLandmarks.__getitem__
    def recording(self, index):
        if self.split == "train":
            seen.append(int(index))
        return load(self, index)
    data.SyntheticLandmarks.__getitem__ = recording
    # Each rank gets its own --out so the test can see which rank wrote files.
    result = train.main(args + ["--out", f"{tmp}/run_rank{rank}"])
    torch.save(result["model"].state_dict(), f"{tmp}/weights_rank{rank}.pt")
    with open(f"{tmp}/seen_rank{rank}.json", "w") as f:
        json.dump(seen, f)
    torch.distributed.destroy_process_group()
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo_ranks_agree_see_different_data_and_match_one_process(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE="2",
               PYTHONPATH=os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")])))
    procs = [
        subprocess.Popen([sys.executable, str(script), str(rank), str(tmp_path),
                          json.dumps(ARGS + ["--batch-size", str(PER_RANK_BATCH)])],
                         env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank)),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for rank in range(2)
    ]
    outputs = []
    for p in procs:
        try:
            outputs.append(p.communicate(timeout=240)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("DDP workers timed out")
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out
    w0 = torch.load(tmp_path / "weights_rank0.pt", weights_only=True)
    w1 = torch.load(tmp_path / "weights_rank1.pt", weights_only=True)
    for key in w0:
        assert torch.equal(w0[key], w1[key]), key
    from coorkern.engine.checkpoints import build_model, load_checkpoint

    ckpt = load_checkpoint(tmp_path / "run_rank0" / "checkpoint_last.pt")
    assert ckpt["config"]["environment"]["world_size"] == 2
    assert (tmp_path / "run_rank0" / "metrics.json").is_file()
    assert not (tmp_path / "run_rank1").exists()
    assert "coorkern.train:" in outputs[0] and "coorkern.train:" not in outputs[1]
    # Training happened (2 steps of 2 x 4 images): the weights moved from the seeded initialization.
    torch.manual_seed(0)
    init = build_model(ckpt["model_config"]).state_dict()
    assert not torch.equal(init["stem.0.0.weight"], w0["stem.0.0.weight"])
    assert torch.equal(ckpt["model"]["stem.0.0.weight"], w0["stem.0.0.weight"])

    # The ranks trained on disjoint halves of the training set, together all of it.
    seen = [json.loads((tmp_path / f"seen_rank{rank}.json").read_text()) for rank in range(2)]
    assert len(seen[0]) == len(seen[1]) == 8
    assert not set(seen[0]) & set(seen[1]) and sorted(seen[0] + seen[1]) == list(range(16))
    # One process with the same effective batch (2 x 4) takes the same steps; only BatchNorm's
    # statistics differ (per rank over 4 images vs over 8), so the weights agree closely, not exactly.
    from coorkern import train

    init["head.bias"].fill_(-4.0)  # train's --head-bias default
    single = train.main(ARGS + ["--batch-size", str(2 * PER_RANK_BATCH), "--out", str(tmp_path / "single")])
    ws = single["model"].state_dict()
    moved = sum(float((ws[k] - init[k]).norm() ** 2) for k in init if ws[k].is_floating_point()) ** 0.5
    apart = sum(float((ws[k] - w0[k]).norm() ** 2) for k in init if ws[k].is_floating_point()) ** 0.5
    print(f"single-process step {moved:.4g}, DDP vs single {apart:.4g}")
    assert apart < 0.25 * moved, (apart, moved)
