"""Two-process DistributedDataParallel training with gloo on CPU (what torchrun sets up)."""

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

WORKER = textwrap.dedent(
    """
    import sys, torch
    from coorkern import train
    rank, tmp = int(sys.argv[1]), sys.argv[2]
    # Each rank gets its own --out so the test can see which rank wrote files.
    result = train.main(["--image-size", "64", "64", "--train-samples", "16", "--val-samples", "4",
                         "--test-samples", "4", "--batch-size", "4", "--epochs", "1", "--base-channels", "4",
                         "--heads", "2", "2", "1", "1", "--no-progress", "--threads", "1", "--overlays", "1",
                         "--out", f"{tmp}/run_rank{rank}"])
    torch.save(result["model"].state_dict(), f"{tmp}/weights_rank{rank}.pt")
    torch.distributed.destroy_process_group()
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo_ranks_agree_and_only_rank0_writes(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE="2",
               PYTHONPATH=os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")])))
    procs = [
        subprocess.Popen([sys.executable, str(script), str(rank), str(tmp_path)],
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
    from coorkern._runs import build_model, load_checkpoint

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
