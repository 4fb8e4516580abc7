"""`fit` under torchrun with the gloo backend, 2 processes on the CPU: one DDP step equals one full-batch step, and a
run killed mid-training (SIGKILL, every process) resumes from its checkpoint to bitwise the weights of an uninterrupted
run. The jobs are `python -m tltutor.distributed` (see nbs/22_scale_out.ipynb)."""
import os

import pytest
import torch

from tltutor.core import dist_info, shard_loader
from tltutor.distributed import max_abs_diff, one_step, tiny_mlp, torchrun, torchrun_cmd


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    "One 2-process launch: the one-step weights and an uninterrupted resumable run."
    d = tmp_path_factory.mktemp("ddp")
    torchrun(["--one-step", d / "one_step.pt", "--resume", d / "ref.ckpt", "--resume-out", d / "ref.pt"], nproc=2)
    return d


def test_one_ddp_step_equals_full_batch_step(reference):
    ddp = tiny_mlp(); ddp.load_state_dict(torch.load(reference / "one_step.pt"))
    single = one_step()  # this process, no group: the whole batch of 64
    diff = max_abs_diff(ddp, single)
    assert diff <= 1e-6, diff
    assert max_abs_diff(single, tiny_mlp()) > 1e-3  # the step did move the weights


def test_kill_and_resume_gives_the_uninterrupted_weights(reference, tmp_path):
    ck = tmp_path / "run.ckpt"
    killed = torchrun(["--resume", ck, "--resume-out", tmp_path / "never.pt", "--kill-at-step", 20], nproc=2, check=False)
    assert killed.returncode != 0 and not (tmp_path / "never.pt").exists()
    assert torch.load(ck, weights_only=False)["epoch"] == 2  # 8 steps per epoch: killed in epoch 3
    torchrun(["--resume", ck, "--resume-out", tmp_path / "resumed.pt"], nproc=2)
    ref, res = torch.load(reference / "ref.pt"), torch.load(tmp_path / "resumed.pt")
    assert ref.keys() == res.keys()
    for k in ref: assert torch.equal(ref[k], res[k]), k


def test_single_process_is_left_alone():
    from torch.utils.data import DataLoader, TensorDataset
    assert dist_info() == (0, 1)
    dl = DataLoader(TensorDataset(torch.zeros(4, 1)), batch_size=2, shuffle=True)
    assert shard_loader(dl) is dl


def test_bad_launch_arguments():
    with pytest.raises(ValueError, match="positive integer"): torchrun_cmd(["--bench", "x"], nproc=0)
    with pytest.raises(TypeError, match="list of strings"): torchrun_cmd("--bench x")
    with pytest.raises(RuntimeError, match="failed"): torchrun(["--no-such-flag"], nproc=1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: make gpu-check runs for real")
def test_gpu_check_skips_cleanly_without_a_gpu():
    import subprocess, sys
    from pathlib import Path
    r = subprocess.run([sys.executable, str(Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "gpu-check: skipped: no CUDA GPU here:" in r.stdout
