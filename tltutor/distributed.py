from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tltutor.core import Callback, default_device, dist_info, fit, seed_everything
def init_distributed(backend: str | None = None) -> tuple[int, int, torch.device]:
    """Join the process group that `torchrun` describes in the environment (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`,
    `MASTER_ADDR`/`MASTER_PORT`): backend `nccl` with one GPU per process when CUDA is there, else `gloo` on the CPU.
    Returns `(rank, world_size, device)`. Outside torchrun (no `WORLD_SIZE`) it initialises nothing: `(0, 1, device)`."""
    if backend is not None and backend not in ("gloo", "nccl"):
        raise ValueError(f"backend={backend!r}: use 'gloo' (CPU), 'nccl' (CUDA GPUs) or None (nccl if CUDA is there).")
    if "WORLD_SIZE" not in os.environ: return 0, 1, default_device()
    if torch.distributed.is_initialized(): return (*dist_info(), default_device())
    if "RANK" not in os.environ or "MASTER_ADDR" not in os.environ:
        raise RuntimeError("WORLD_SIZE is set but RANK/MASTER_ADDR are not: start the processes with torchrun "
                           "(e.g. torchrun --nproc_per_node=2 -m tltutor.cli train ...).")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        if not torch.cuda.is_available(): raise RuntimeError("backend='nccl' needs CUDA GPUs; use 'gloo' on the CPU.")
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local); device = torch.device("cuda", local)
    else: device = torch.device("cpu")
    torch.distributed.init_process_group(backend)
    return torch.distributed.get_rank(), torch.distributed.get_world_size(), device

def finish_distributed():
    "Leave the process group (a no-op outside one); call it once at the end of a torchrun script."
    if torch.distributed.is_available() and torch.distributed.is_initialized(): torch.distributed.destroy_process_group()

def torchrun_cmd(args, nproc: int = 2, module: str = "tltutor.distributed", nnodes: int = 1) -> list[str]:
    "The command line `torchrun --standalone --nproc_per_node=nproc -m module *args` (via this Python)."
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"nproc={nproc!r} must be a positive integer (processes on this machine).")
    if isinstance(args, str): raise TypeError("args must be a list of strings, e.g. ['one-step', '--out', 'w.pt'].")
    launch = ["--standalone"] if nnodes == 1 else [f"--nnodes={nnodes}"]
    return [sys.executable, "-m", "torch.distributed.run", *launch, f"--nproc_per_node={nproc}", "-m", module,
            *map(str, args)]

def torchrun(args, nproc: int = 2, module: str = "tltutor.distributed", timeout: float = 600,
             check: bool = True) -> subprocess.CompletedProcess:
    """Run `module` under `torchrun` with `nproc` processes on this machine (one thread each) and wait; with `check`,
    a failure raises with the tail of the processes' output."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
           "PYTHONUNBUFFERED": "1"}
    r = subprocess.run(torchrun_cmd(args, nproc, module), capture_output=True, text=True, timeout=timeout, env=env)
    if check and r.returncode != 0:
        raise RuntimeError(f"torchrun {module} {' '.join(map(str, args))} failed (exit {r.returncode}):\n"
                           + (r.stdout + r.stderr)[-3000:])
    return r
def tiny_mlp(d_in: int = 10, hidden: int = 32, n_classes: int = 3, seed: int = 0) -> nn.Sequential:
    "A two-layer MLP with weights fixed by `seed` (the same on every process), for the scale-out demos."
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, n_classes))

def toy_data(n: int = 64, d_in: int = 10, n_classes: int = 3, seed: int = 0) -> TensorDataset:
    "`n` Gaussian points in `d_in` dimensions labelled by a fixed random linear rule (same for every process)."
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g)
    y = (x @ torch.randn(d_in, n_classes, generator=g)).argmax(1)
    return TensorDataset(x, y)

def one_step(n: int = 64, lr: float = 0.1) -> nn.Module:
    """One SGD step of `tiny_mlp` with `fit` on `toy_data(n)`, split evenly over the processes of the group (one
    process: the whole batch of `n`); returns the model."""
    _, world = dist_info()
    if n % world: raise ValueError(f"n={n} does not split evenly over {world} processes.")
    model = tiny_mlp()
    dl = DataLoader(toy_data(n), batch_size=n // world, shuffle=False)
    fit(model, dl, epochs=1, opt=lambda ps: torch.optim.SGD(ps, lr=lr), device="cpu", progress=False)
    return model

def max_abs_diff(a: nn.Module, b: nn.Module) -> float:
    "Largest absolute difference between the parameters of two models of the same architecture."
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    if pa.keys() != pb.keys(): raise ValueError("the two models have different parameters (not the same architecture).")
    return max((pa[k].detach() - pb[k].detach()).abs().max().item() for k in pa)
def small_cnn(width: int = 16, n_classes: int = 10) -> nn.Sequential:
    "A small CNN for 28x28 grey images (no BatchNorm: every process computes the same function)."
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, width, 3, stride=2, padding=1), nn.ReLU(),
                         nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(2 * width * 49, 128), nn.ReLU(), nn.Linear(128, n_classes))

def bench(steps: int = 20, batch_size: int = 64, width: int = 16) -> dict:
    """Time `fit` on random 28x28 images, `batch_size` per process (so `world_size` x `batch_size` per step), and the
    share of a step that waits for DDP's all-reduce: `1 - t(step without sync) / t(step)`, with the gradient sync
    switched off by `no_sync()` (0 for one process). Returns `{world_size, steps_per_s, samples_per_s, comm_share}`."""
    rank, world = dist_info()
    model = small_cnn(width)
    n = steps * batch_size * world
    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.rand(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g))
    dl = DataLoader(ds, batch_size=batch_size, shuffle=False)
    h = fit(model, dl, epochs=2, lr=1e-3, device="cpu", progress=False)  # epoch 1 warms up
    steps_per_s = steps / h[-1]["seconds"]
    comm = 0.0
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel
        net, opt = DistributedDataParallel(model), torch.optim.SGD(model.parameters(), lr=1e-3)
        xb, yb = ds.tensors[0][:batch_size], ds.tensors[1][:batch_size]
        def step(sync):
            t = time.perf_counter()
            opt.zero_grad()
            if sync: nn.functional.cross_entropy(net(xb), yb).backward()
            else:
                with net.no_sync(): nn.functional.cross_entropy(net(xb), yb).backward()
            opt.step()
            return time.perf_counter() - t
        times = {True: [], False: []}
        for i in range(2 * steps):  # alternate, so both see the same machine load
            for sync in (True, False): times[sync].append(step(sync))
        t_sync, t_local = (float(torch.tensor(times[s][2:]).median()) for s in (True, False))
        t = torch.tensor([t_sync, t_local], dtype=torch.float64)
        torch.distributed.all_reduce(t); t_sync, t_local = (t / world).tolist()  # mean over ranks
        comm = max(0.0, 1 - t_local / t_sync)
    return {"world_size": world, "steps_per_s": steps_per_s, "samples_per_s": steps_per_s * batch_size * world,
            "comm_share": comm}
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

def _class_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))

def _images(d: Path) -> list[Path]:
    return sorted(p for p in d.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS)

def scan_image_folder(root) -> dict:
    """Check an image folder for `tltutor train` and list it: `{split: {class: [files]}}` with splits `train` and
    `val` when `root` has those subfolders, else one split `all` (class = subfolder). Every image is opened, so an
    unreadable one fails here, by name, rather than in the middle of training."""
    from PIL import Image, UnidentifiedImageError
    root = Path(root)
    if not root.is_dir(): raise ValueError(f"{str(root)!r} is not a folder; pass a folder with one subfolder of images per class.")
    splits = {"train": root / "train", "val": root / "val"} if (root / "train").is_dir() else {"all": root}
    out = {}
    for split, d in splits.items():
        if not d.is_dir(): raise ValueError(f"{str(root)!r} has train/ but no {split}/ subfolder: add it, or put the class folders directly in {str(root)!r}.")
        classes = {c.name: _images(c) for c in _class_dirs(d)}
        classes = {c: fs for c, fs in classes.items() if fs}
        if not classes:
            raise ValueError(f"{str(d)!r} holds no images in class subfolders (expected e.g. {d}/cat/1.jpg, {d}/dog/2.jpg; "
                             f"extensions: {', '.join(IMAGE_EXTS)}).")
        if len(classes) < 2:
            raise ValueError(f"{str(d)!r} has one class only ({next(iter(classes))!r}): a classifier needs at least 2 "
                             "class subfolders.")
        out[split] = classes
    if "train" in out and sorted(out["train"]) != sorted(out["val"]):
        raise ValueError(f"train/ and val/ have different classes: {sorted(out['train'])} vs {sorted(out['val'])}.")
    for split in out.values():
        for files in split.values():
            for f in files:
                try:
                    with Image.open(f) as im: im.verify()
                except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
                    raise ValueError(f"cannot read image {str(f)!r} ({type(e).__name__}: {e}); fix or remove it.") from None
    return out

class FileImages(torch.utils.data.Dataset):
    "Images read from `files` (RGB, resized to `size` x `size`, ImageNet-normalised) with integer labels `labels`."
    def __init__(self, files, labels, size: int = 96):
        if len(files) != len(labels): raise ValueError(f"{len(files)} files but {len(labels)} labels.")
        from torchvision import transforms as T
        from tltutor.data import IMAGENET_MEAN, IMAGENET_STD
        self.files, self.labels, self.size = [str(f) for f in files], [int(l) for l in labels], size
        self.tf = T.Compose([T.Resize((size, size), antialias=True), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    def __len__(self): return len(self.files)
    def __getitem__(self, i):
        from PIL import Image
        with Image.open(self.files[i]) as im: x = self.tf(im.convert("RGB"))
        return x, torch.tensor(self.labels[i])

def folder_split(root, out=None, val_fraction: float = 0.2, seed: int = 0) -> dict:
    """The train/val split of an image folder: its own `train/`/`val/` subfolders, else a stratified random split of
    `val_fraction` per class (fixed by `seed`), saved to `out/split.json` and re-read from there on a resumed run.
    Returns `{classes, train: [(file, label)], val: [(file, label)]}`."""
    if not 0 < val_fraction < 1: raise ValueError(f"val_fraction={val_fraction!r} must be in (0, 1), e.g. 0.2.")
    saved = Path(out) / "split.json" if out is not None else None
    if saved is not None and saved.is_file(): return json.loads(saved.read_text())
    scan = scan_image_folder(root)
    classes = sorted(next(iter(scan.values())))
    if "all" in scan:
        g, train, val = torch.Generator().manual_seed(seed), [], []
        for c, files in scan["all"].items():
            if len(files) < 2: raise ValueError(f"class {c!r} has {len(files)} image; it needs at least 2 (one to train, one to validate).")
            perm = torch.randperm(len(files), generator=g).tolist()
            k = min(max(1, round(val_fraction * len(files))), len(files) - 1)
            val += [(str(files[i]), classes.index(c)) for i in perm[:k]]
            train += [(str(files[i]), classes.index(c)) for i in perm[k:]]
    else:
        train = [(str(f), classes.index(c)) for c, fs in scan["train"].items() for f in fs]
        val = [(str(f), classes.index(c)) for c, fs in scan["val"].items() for f in fs]
    split = {"root": str(Path(root).resolve()), "classes": classes, "train": sorted(train), "val": sorted(val)}
    if saved is not None and dist_info()[0] == 0:
        saved.parent.mkdir(parents=True, exist_ok=True)
        from tltutor.core import atomic_write_text
        atomic_write_text(saved, json.dumps(split, indent=1))
    return split
def train_folder(data_dir, out, backbone: str = "mobilenet_v2", method: str = "finetune", epochs: int = 3,
                 head_epochs: int = 1, batch_size: int = 32, lr: float = 1e-3, size: int = 96, val_fraction: float = 0.2,
                 seed: int = 0, workers: int = 0, progress: bool = True) -> dict:
    """Train `backbone` (ImageNet-pretrained, new head) on the image folder `data_dir` with the fine-tuning chapter's
    recipe and write `out/metrics.json`; the work behind `tltutor train`. `method="probe"`: the head alone, on cached
    features, for `epochs`; `"finetune"`: the head first (`head_epochs`), then the whole network (`epochs`, warm-up and
    discriminative rates). `batch_size` is the global batch, split over the processes when run under torchrun, so the
    recipe does not change with their number. Checkpoints in `out/` after every epoch: the same call after a kill
    continues from the last complete epoch. Returns the metrics."""
    from tltutor.backbones import pretrained
    from tltutor.core import evaluate, shard_loader
    from tltutor.finetune import fine_tune, train_head
    if method not in ("probe", "finetune"): raise ValueError(f"method={method!r}: use 'probe' (head only) or 'finetune'.")
    for nm, v, lo in (("epochs", epochs, 1), ("head_epochs", head_epochs, 0), ("batch_size", batch_size, 1),
                      ("size", size, 16), ("workers", workers, 0), ("seed", seed, 0)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo: raise ValueError(f"{nm}={v!r} must be an integer >= {lo}.")
    t0 = time.perf_counter()
    rank, world, device = init_distributed()
    if batch_size % world:
        raise ValueError(f"batch_size={batch_size} (the global batch) does not split over {world} processes; use a multiple of {world}.")
    out = Path(out); out.mkdir(parents=True, exist_ok=True)
    split = folder_split(data_dir, out, val_fraction, seed)
    classes = split["classes"]
    seed_everything(seed)
    model = pretrained(backbone, num_classes=len(classes), device=device)
    train_ds = FileImages(*zip(*split["train"]), size=size)
    val_ds = FileImages(*zip(*split["val"]), size=size)
    per_rank = batch_size // world
    pin = device.type == "cuda"
    train_dl = DataLoader(train_ds, batch_size=per_rank, shuffle=True, generator=torch.Generator().manual_seed(seed),
                          num_workers=workers, pin_memory=pin)
    val_dl = DataLoader(val_ds, batch_size=2 * per_rank, num_workers=workers, pin_memory=pin)
    ck_head, ck_all = out / "checkpoint-head.pt", out / "checkpoint-all.pt"
    done = [torch.load(p, map_location="cpu", weights_only=False)["epoch"] for p in (ck_head, ck_all) if p.is_file()]
    if rank == 0 and progress:
        print(f"tltutor train: {len(train_ds)} train / {len(val_ds)} val images, {len(classes)} classes, {backbone}, "
              f"{method}, {world} process(es) x batch {per_rank} on {device}")
        if done: print(f"tltutor train: resuming from the checkpoints in {out} (epochs done: {done})")
    rows = []
    if method == "probe":
        h = train_head(model, train_dl, val_dl, epochs=epochs, lr=lr, batch_size=per_rank, device=device, checkpoint=ck_head)
        rows = [dict(r, phase="head") for r in h.rows]
    else:
        if head_epochs and ck_all.is_file():  # the head phase ended before the whole-network phase began
            rows = [dict(r, phase="head") for r in torch.load(ck_head, map_location="cpu", weights_only=False)["history"]]
        elif head_epochs:
            h = train_head(model, train_dl, val_dl, epochs=head_epochs, lr=lr, batch_size=per_rank, device=device,
                           checkpoint=ck_head)
            rows = [dict(r, phase="head") for r in h.rows]
        h = fine_tune(model, shard_loader(train_dl), val_dl, epochs=epochs, freeze_epochs=0, lr=lr, device=device,
                      progress=progress and rank == 0, checkpoint=ck_all)
        rows += [dict(r, epoch=r["epoch"] + head_epochs, phase="all") for r in h.rows]
    res = evaluate(model, val_dl, device=device)
    metrics = {"val_accuracy": res["accuracy"], "val_loss": res["loss"], "classes": classes, "n_train": len(train_ds),
               "n_val": len(val_ds), "backbone": backbone, "method": method, "epochs": epochs,
               "head_epochs": head_epochs if method == "finetune" else 0, "batch_size": batch_size, "lr": lr,
               "size": size, "processes": world, "resumed_after": done, "seconds": time.perf_counter() - t0,
               "history": rows}
    if rank == 0:
        from tltutor.core import atomic_write_text
        torch.save(model.state_dict(), out / "model.pt")
        atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=1) + "\n")
        if progress: print(f"tltutor train: val accuracy {res['accuracy']:.3f}; wrote {out / 'metrics.json'} and {out / 'model.pt'}")
    return metrics
class KillAt(Callback):
    "`fit` callback that kills its own process (SIGKILL: no clean-up, as an out-of-memory kill or a lost node) at `step`."
    def __init__(self, step: int): self.step = step
    def after_step(self, state):
        if state.step == self.step: os.kill(os.getpid(), signal.SIGKILL)

def resumable_run(checkpoint, epochs: int = 4, kill_at_step: int | None = None, n: int = 256) -> nn.Module:
    """`fit` a `tiny_mlp` with dropout, shuffling and a learning-rate schedule on `toy_data(n)` for `epochs`, saving a
    checkpoint every epoch (and resuming from it when it exists); `kill_at_step` kills the process at that step."""
    _, world = dist_info()
    seed_everything(0)
    model = tiny_mlp(); model.insert(2, nn.Dropout(0.2))
    dl = DataLoader(toy_data(n), batch_size=32 // world, shuffle=True, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=8, gamma=0.5)
    fit(model, dl, epochs=epochs, opt=opt, sched=sched, device="cpu", progress=False, checkpoint=checkpoint,
        callbacks=[KillAt(kill_at_step)] if kill_at_step else None)
    return model

def _main(argv=None) -> int:
    "`python -m tltutor.distributed`: the scale-out chapter's jobs, meant to run under torchrun; each flag adds one."
    p = argparse.ArgumentParser(prog="python -m tltutor.distributed", description="the scale-out chapter's jobs")
    p.add_argument("--one-step", metavar="FILE", help="one SGD step of tiny_mlp; save its weights to FILE")
    p.add_argument("--bench", metavar="FILE", help="time fit and the all-reduce share of a step; write JSON to FILE")
    p.add_argument("--steps", type=int, default=20, help="steps per timed epoch of --bench")
    p.add_argument("--resume", metavar="CKPT", help="resumable_run with checkpoint CKPT")
    p.add_argument("--resume-out", metavar="FILE", help="save the resumable run's final weights to FILE")
    p.add_argument("--kill-at-step", type=int, default=None, help="kill every process at this step of --resume")
    args = p.parse_args(argv)
    if not (args.one_step or args.bench or args.resume): p.error("give at least one of --one-step, --bench, --resume")
    torch.set_num_threads(1)
    rank, world, _ = init_distributed("gloo")
    try:
        if args.one_step:
            w = one_step().state_dict()
            if rank == 0: torch.save(w, args.one_step)
        if args.bench:
            res = bench(args.steps)
            if rank == 0: Path(args.bench).write_text(json.dumps(res))
        if args.resume:
            w = resumable_run(args.resume, kill_at_step=args.kill_at_step).state_dict()
            if rank == 0 and args.resume_out: torch.save(w, args.resume_out)
    finally: finish_distributed()
    return 0

if __name__ == "__main__" and "ipykernel" not in sys.modules:
    sys.exit(_main())
