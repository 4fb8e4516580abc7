"""`make gpu-check`: the course on a CUDA GPU, in a few minutes.

1. `fit` with `amp=True` (bfloat16 autocast) on CUDA, images per second against this machine's CPU;
2. one chapter notebook executed with `TLTUTOR_DEVICE=cuda` (default: 10_feature_extraction; `--chapter`);
3. with two or more GPUs: one DDP step under torchrun with the nccl backend, checked against one full-batch step.

Without a CUDA GPU it prints why it skips and exits 0, so it is safe to run anywhere."""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def images_per_s(device: str, amp: bool, steps: int = 30, batch_size: int = 256) -> float:
    from torch.utils.data import DataLoader, TensorDataset
    from tltutor.core import fit
    from tltutor.distributed import small_cnn
    n = steps * batch_size
    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.rand(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g))
    dl = DataLoader(ds, batch_size=batch_size, pin_memory=device == "cuda")
    h = fit(small_cnn(32), dl, epochs=2, device=device, amp=amp, progress=False)  # epoch 1 warms up
    return n / h[-1]["seconds"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--chapter", default="10_feature_extraction", help="chapter notebook to run on the GPU")
    p.add_argument("--timeout", type=int, default=1200, help="seconds allowed for the chapter")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        why = ("this torch has no CUDA support (CPU build)" if torch.version.cuda is None else
               f"torch {torch.__version__} (CUDA {torch.version.cuda}) finds no usable GPU (driver or CUDA_VISIBLE_DEVICES?)")
        print(f"gpu-check: skipped: no CUDA GPU here: {why}.")
        return 0
    n_gpu = torch.cuda.device_count()
    print(f"gpu-check: {n_gpu} GPU(s), {torch.cuda.get_device_name(0)}; torch {torch.__version__}, CUDA {torch.version.cuda}")
    failed = []
    # 1. fit with amp on CUDA against the CPU
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    cpu = images_per_s("cpu", amp=False, steps=5)
    gpu = images_per_s("cuda", amp=True)
    print(f"1. fit, small CNN, batch 256: CPU {cpu:,.0f} images/s; CUDA with amp {gpu:,.0f} images/s ({gpu / cpu:.1f}x)")
    # 2. a chapter on CUDA
    nb = ROOT / "nbs" / f"{args.chapter}.ipynb"
    with tempfile.TemporaryDirectory() as d:
        env = {**os.environ, "TLTUTOR_DEVICE": "cuda", "TLTUTOR_RESULTS": d, "TLTUTOR_GOLDEN": ""}
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "jupyter", "nbconvert", "--to", "notebook", "--execute",
                            f"--ExecutePreprocessor.timeout={args.timeout}", "--output-dir", d, str(nb)],
                           capture_output=True, text=True, env=env, cwd=nb.parent)
        t = time.perf_counter() - t0
        if r.returncode == 0:
            res = {f.stem: json.loads(f.read_text()) for f in Path(d).glob("*.json")}
            print(f"2. {nb.name} on CUDA: ran in {t:.0f} s; recorded: "
                  + "; ".join(f"{k}: " + ", ".join(f"{m}={v:.3f}" for m, v in r_.items() if isinstance(v, float))
                              for k, r_ in res.items()))
        else:
            failed.append("chapter"); print(f"2. {nb.name} on CUDA FAILED after {t:.0f} s:\n{r.stderr[-2000:]}")
    # 3. DDP with nccl
    if n_gpu >= 2:
        from tltutor.distributed import max_abs_diff, one_step, tiny_mlp, torchrun
        with tempfile.TemporaryDirectory() as d:
            t0 = time.perf_counter()
            torchrun(["--one-step", Path(d) / "w.pt", "--backend", "nccl"], nproc=2)
            ddp = tiny_mlp(); ddp.load_state_dict(torch.load(Path(d) / "w.pt"))
            diff = max_abs_diff(ddp, one_step())
            ok = diff <= 1e-6
            if not ok: failed.append("ddp")
            print(f"3. one DDP step, nccl, 2 GPUs vs one full-batch step on the CPU: largest weight difference {diff:.2e} "
                  f"({'ok' if ok else 'FAILED'}; {time.perf_counter() - t0:.0f} s with start-up)")
    else: print("3. DDP with nccl: skipped (needs 2 or more GPUs; this machine has 1)")
    print("gpu-check: " + ("all passed" if not failed else f"FAILED: {', '.join(failed)}"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
