"""tltutor.core: bad inputs, a tiny learnable problem, determinism, results files."""
import json

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tltutor.core import (Callback, History, accuracy, default_device, evaluate, fit, predict, record,
                          seed_everything)


def blobs(n=400, seed=0):
    "Two well-separated Gaussian blobs in 2-d."
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = torch.randn(n, 2, generator=g) * 0.5 + (y[:, None] * 2 - 1) * 2.0
    return TensorDataset(x, y)


def loaders(seed=0):
    g = torch.Generator().manual_seed(seed)
    return DataLoader(blobs(400, 0), batch_size=32, shuffle=True, generator=g), DataLoader(blobs(200, 1), batch_size=64)


def test_fit_learns_separable_problem():
    seed_everything(0)
    train_dl, valid_dl = loaders()
    model = nn.Linear(2, 2)
    hist = fit(model, train_dl, valid_dl, epochs=5, lr=0.05, device="cpu", progress=False)
    assert len(hist) == 5
    assert hist.last["accuracy"] >= 0.95
    assert hist["train_loss"][-1] < hist["train_loss"][0]
    # evaluate agrees with the history's last row and with a by-hand accuracy
    res = evaluate(model, valid_dl, device="cpu")
    assert res["accuracy"] == pytest.approx(hist.last["accuracy"])
    logits, y = predict(model, valid_dl, device="cpu")
    assert logits.shape == (200, 2) and y.shape == (200,)
    assert res["accuracy"] == pytest.approx((logits.argmax(1) == y).float().mean().item())


def test_same_seed_same_history():
    runs = []
    for _ in range(2):
        seed_everything(123)
        train_dl, valid_dl = loaders(seed=123)
        model = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 2))
        h = fit(model, train_dl, valid_dl, epochs=3, lr=1e-2, device="cpu", progress=False)
        runs.append((h["train_loss"], h["valid_loss"], h["accuracy"], [p.detach().clone() for p in model.parameters()]))
    assert runs[0][:3] == runs[1][:3]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][3], runs[1][3]))


@pytest.mark.parametrize("epochs", [0, -1, 1.5, True, "3"])
def test_bad_epochs(epochs):
    train_dl, _ = loaders()
    with pytest.raises(ValueError, match="positive integer"):
        fit(nn.Linear(2, 2), train_dl, epochs=epochs, device="cpu")


def test_empty_dataloader():
    empty = DataLoader(TensorDataset(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long)), batch_size=4)
    with pytest.raises(ValueError, match="no batches"):
        fit(nn.Linear(2, 2), empty, device="cpu")
    with pytest.raises(ValueError, match="no batches"):
        evaluate(nn.Linear(2, 2), empty, device="cpu")


def test_model_loss_mismatch_is_explained():
    train_dl, _ = loaders()
    with pytest.raises(ValueError, match="one output per class"):
        fit(nn.Linear(2, 1), train_dl, device="cpu", progress=False)  # 1 output, 2 classes


def test_not_a_model_or_loader():
    train_dl, _ = loaders()
    with pytest.raises(TypeError, match="nn.Module"):
        fit(lambda x: x, train_dl, device="cpu")
    with pytest.raises(TypeError, match="iterable of batches"):
        fit(nn.Linear(2, 2), 42, device="cpu")
    with pytest.raises(TypeError, match="a batch must be a tuple"):
        fit(nn.Linear(2, 2), [torch.zeros(4, 2)], device="cpu", progress=False)


def test_frozen_model_and_bad_options():
    train_dl, _ = loaders()
    m = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        fit(m, train_dl, device="cpu")
    with pytest.raises(ValueError, match="clip_grad"):
        fit(nn.Linear(2, 2), train_dl, clip_grad=0, device="cpu")
    with pytest.raises(ValueError, match="unknown metric"):
        fit(nn.Linear(2, 2), train_dl, metrics=["acc"], device="cpu")
    with pytest.raises(TypeError, match="pass an instance"):
        fit(nn.Linear(2, 2), train_dl, callbacks=[Callback], device="cpu")
    with pytest.raises(TypeError, match="opt="):
        fit(nn.Linear(2, 2), train_dl, opt="adam", device="cpu")


def test_divergence_is_reported():
    train_dl, _ = loaders()
    class Explode(Callback):
        def after_loss(self, state): state.loss = state.loss * float("nan")
    with pytest.raises(FloatingPointError, match="lower the learning rate|before any update"):
        fit(nn.Linear(2, 2), train_dl, callbacks=[Explode()], device="cpu", progress=False)


def test_callbacks_see_every_hook_in_order_and_can_stop():
    train_dl, valid_dl = loaders()
    seen = []
    class Spy(Callback):
        def before_fit(self, s): seen.append("before_fit")
        def before_epoch(self, s): seen.append("before_epoch")
        def after_step(self, s):
            if s.step == 3: s.stop = True
        def after_epoch(self, s): s.log["extra"] = 1.0; seen.append("after_epoch")
        def after_fit(self, s): seen.append("after_fit")
    h = fit(nn.Linear(2, 2), train_dl, valid_dl, epochs=4, callbacks=Spy(), device="cpu", progress=False)
    assert seen == ["before_fit", "before_epoch", "after_epoch", "after_fit"]
    assert len(h) == 1 and h.last["extra"] == 1.0


def test_scheduler_and_factory_optimizer():
    from functools import partial
    train_dl, _ = loaders()
    model = nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    fit(model, train_dl, epochs=1, opt=opt, sched=sched, device="cpu", progress=False)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 ** len(train_dl))
    h = fit(nn.Linear(2, 2), train_dl, epochs=1, opt=partial(torch.optim.SGD, lr=0.1), device="cpu", progress=False)
    assert len(h) == 1


def test_accuracy_and_device_errors():
    assert accuracy(torch.tensor([[0., 1.]]), torch.tensor([1])) == 1.0
    with pytest.raises(ValueError, match="shape"):
        accuracy(torch.zeros(2, 2), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="not a device name"):
        default_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            default_device("cuda")
    with pytest.raises(ValueError, match="must be an integer"):
        seed_everything("7")


def test_history_table_and_plot():
    import matplotlib
    matplotlib.use("Agg")
    h = History([{"epoch": 1, "train_loss": 1.23456, "accuracy": 0.5, "seconds": 9.9}])
    assert "1.235" in repr(h) and "seconds" not in repr(h)
    assert "seconds" in h.table(timing=True)
    assert len(h.plot()) == 2
    with pytest.raises(ValueError, match="empty"):
        History().plot()


def test_record_writes_json(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TLTUTOR_RESULTS", str(tmp_path))
    monkeypatch.delenv("TLTUTOR_GOLDEN", raising=False)  # a throw-away chapter: no golden values
    p = record("t_core", acc=np.float64(0.912345), n=torch.tensor(3), groups={"a": 0.1})
    data = json.loads(p.read_text())
    assert data["acc"] == pytest.approx(0.912345) and data["n"] == 3 and data["groups"] == {"a": 0.1}
    assert data["_meta"]["chapter"] == "t_core" and data["_meta"]["seconds"] >= 0
    out = capsys.readouterr().out
    assert "0.912" in out and "groups.a" in out
    record("t_core", lr=1e-4, tiny=3.14159e-7, zero=0.0)     # small numbers keep their significant digits
    out = capsys.readouterr().out
    assert "lr    0.0001" in out and "3.14e-07" in out and "zero  0.0" in out, out
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(ValueError, match="finite"):
        record("t_core", acc=float("nan"))
    with pytest.raises(TypeError, match="array"):
        record("t_core", acc=torch.zeros(3))
    with pytest.raises(ValueError, match="reserved"):
        record("t_core", _meta=1)


# --- the arithmetic of fit and evaluate, pinned on tiny problems where the answer is known ----------------------------
def _grads(model, x, y):
    "Gradients of the mean cross-entropy of `model` on (x, y), computed directly (not through fit)."
    model.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()
    return [p.grad.detach().clone() for p in model.parameters()]


def _data(n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=g), torch.tensor([0, 1, 2, 1, 0, 2, 2, 1, 0, 1][:n])


def _sgd(lr): return lambda params: torch.optim.SGD(params, lr=lr)


def test_one_sgd_step_is_p_minus_lr_grad():
    torch.manual_seed(0)
    x, y = _data(4)
    model, ref = nn.Linear(3, 3), nn.Linear(3, 3)
    ref.load_state_dict(model.state_dict())
    g = _grads(ref, x, y)
    fit(model, DataLoader(TensorDataset(x, y), batch_size=4), opt=_sgd(0.5), device="cpu", progress=False)
    for p, p0, gp in zip(model.parameters(), ref.parameters(), g):
        torch.testing.assert_close(p.detach(), p0.detach() - 0.5 * gp)


def test_gradients_do_not_accumulate_across_steps():
    torch.manual_seed(0)
    x, y = _data(4)
    model, ref = nn.Linear(3, 3), nn.Linear(3, 3)
    ref.load_state_dict(model.state_dict())
    for sl in (slice(0, 2), slice(2, 4)):  # two steps by hand, each on its own batch's gradient only
        g = _grads(ref, x[sl], y[sl])
        with torch.no_grad():
            for p, gp in zip(ref.parameters(), g): p -= 0.5 * gp
    fit(model, DataLoader(TensorDataset(x, y), batch_size=2), opt=_sgd(0.5), device="cpu", progress=False)
    for p, pr in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.detach(), pr.detach())


def test_epoch_train_loss_is_item_weighted_with_a_short_last_batch():
    torch.manual_seed(0)
    x, y = _data(5)                      # batches of 2, 2 and 1 items
    model = nn.Linear(3, 3)
    with torch.no_grad(): model.weight.mul_(5)   # batch losses that differ a lot, so the two averages differ
    per_item = nn.functional.cross_entropy(model(x), y, reduction="none").detach()
    batch_means = torch.stack([per_item[:2].mean(), per_item[2:4].mean(), per_item[4:].mean()])
    assert abs(per_item.mean() - batch_means.mean()) > 0.05      # the test can tell them apart
    dl = DataLoader(TensorDataset(x, y), batch_size=2)
    hist = fit(model, dl, dl, opt=_sgd(0.0), device="cpu", progress=False)  # lr 0: the model stays as it is
    assert hist.last["train_loss"] == pytest.approx(per_item.mean().item(), rel=1e-6)
    assert hist.last["valid_loss"] == pytest.approx(per_item.mean().item(), rel=1e-6)


def test_evaluate_is_item_weighted_with_a_short_last_batch():
    torch.manual_seed(0)
    x, y = _data(5)
    model = nn.Linear(3, 3)
    with torch.no_grad(): model.weight.mul_(5)
    logits = model(x).detach()
    for bs in (1, 2, 3, 5):
        res = evaluate(model, DataLoader(TensorDataset(x, y), batch_size=bs), device="cpu")
        assert res["loss"] == pytest.approx(nn.functional.cross_entropy(logits, y).item(), rel=1e-6), bs
        assert res["accuracy"] == pytest.approx((logits.argmax(1) == y).float().mean().item()), bs
