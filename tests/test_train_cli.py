"""`tltutor train` on a tiny image folder (Fashion-MNIST images saved as PNG, built here): one process and two under
torchrun finish, each writes one metrics file, and their accuracies agree within noise; a run killed by SIGKILL
continues from its checkpoint; a bad folder or backbone is a usage error that names the problem."""
import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from tltutor.cli import main
from tltutor.distributed import torchrun

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
FAST = ["--size", "32", "--batch-size", "16"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    "2 classes (T-shirt/top, trouser) x 40 Fashion-MNIST training images as PNG files, one subfolder per class."
    from tltutor.data import load
    ds = load("fashion_mnist", "train")
    root = tmp_path_factory.mktemp("images")
    for c in (0, 1):
        d = root / ds.classes[c].replace("/", "-"); d.mkdir()
        for i in (ds.y == c).nonzero().flatten()[:40].tolist():
            Image.fromarray((ds.x[i, 0] * 255).round().byte().numpy()).save(d / f"{i}.png")
    return root


def cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "tltutor.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=ENV, cwd=ROOT)


def test_help():
    r = cli("train", "--help")
    assert r.returncode == 0 and "usage: tltutor train" in r.stdout and "torchrun" in r.stdout


def test_one_and_two_processes_agree(folder, tmp_path):
    args = ["train", folder, "--method", "probe", "--epochs", "10", "--size", "64", "--batch-size", "16"]
    r1 = cli(*args, "--out", tmp_path / "one")
    assert r1.returncode == 0, r1.stderr[-2000:]
    torchrun([*args, "--out", tmp_path / "two"], nproc=2, module="tltutor.cli")
    m1, m2 = (json.loads((tmp_path / o / "metrics.json").read_text()) for o in ("one", "two"))
    assert [p.name for p in (tmp_path / "two").glob("metrics*.json")] == ["metrics.json"]  # rank 0 alone writes
    assert (m1["processes"], m2["processes"]) == (1, 2)
    assert m1["n_val"] == m2["n_val"] == 16 and m1["classes"] == m2["classes"]
    assert m1["val_accuracy"] >= 0.8, m1  # trouser vs T-shirt: easy for ImageNet features
    assert abs(m1["val_accuracy"] - m2["val_accuracy"]) <= 0.125, (m1["val_accuracy"], m2["val_accuracy"])  # 2 of 16


def test_kill_and_resume(folder, tmp_path):
    out = tmp_path / "run"
    args = [sys.executable, "-m", "tltutor.cli", "train", str(folder), "--out", str(out), "--method", "finetune",
            "--epochs", "4", "--head-epochs", "1", *FAST]
    p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV, cwd=ROOT,
                         start_new_session=True)
    ck = out / "checkpoint-all.pt"
    t0 = time.time()
    while not ck.exists() and p.poll() is None and time.time() - t0 < 500: time.sleep(0.05)
    alive = p.poll() is None
    os.killpg(p.pid, signal.SIGKILL); p.wait()
    assert alive, "the run ended before it could be killed"
    assert not (out / "metrics.json").exists()
    r = cli("train", folder, "--out", out, "--method", "finetune", "--epochs", "4", "--head-epochs", "1", *FAST)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming from the checkpoints" in r.stdout, r.stdout
    m = json.loads((out / "metrics.json").read_text())
    assert m["resumed_after"] and min(m["resumed_after"]) >= 1
    assert [h["epoch"] for h in m["history"]] == [1, 2, 3, 4, 5]  # the head epoch + 4 whole-network epochs, none lost
    assert [h["phase"] for h in m["history"]] == ["head"] + ["all"] * 4


def _run(*argv):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()): rc = main(["train", *map(str, argv)])
    return rc, err.getvalue()


def test_bad_folders_and_backbone(folder, tmp_path):
    (tmp_path / "empty").mkdir()
    rc, msg = _run(tmp_path / "empty", "--out", tmp_path / "o")
    assert rc == 2 and "holds no images" in msg
    one = tmp_path / "one" / "cat"; one.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(one / "a.png")
    rc, msg = _run(tmp_path / "one", "--out", tmp_path / "o")
    assert rc == 2 and "one class only" in msg
    bad = tmp_path / "bad"
    for c in ("a", "b"):
        (bad / c).mkdir(parents=True); Image.new("RGB", (8, 8)).save(bad / c / "ok.png")
    (bad / "b" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    rc, msg = _run(bad, "--out", tmp_path / "o")
    assert rc == 2 and "cannot read image" in msg and "broken.jpg" in msg
    rc, msg = _run(folder, "--out", tmp_path / "o2", "--backbone", "no_such_net")
    assert rc == 2 and "unknown backbone 'no_such_net'" in msg
    rc, msg = _run(folder, "--out", tmp_path / "o3", "--batch-size", "0")
    assert rc == 2 and "batch_size=0" in msg
