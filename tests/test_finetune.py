"""tltutor.finetune: bad inputs, param-group coverage, schedules, the L2-SP penalty, and the fine_tune recipe.

Uses randomly initialised torchvision models (no weight files needed) and tiny tensors, so it runs in seconds."""
import math

import numpy as np
import pytest
import torch
import torchvision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tltutor.backbones import layer_groups, replace_head
from tltutor.core import fit, seed_everything
from tltutor.finetune import (L2SP, StepLog, discriminative_param_groups, fine_tune, forgetting, head_features,
                              head_module, train_head, warmup_cosine, with_head)


@pytest.fixture(scope="module")
def mnet():
    torch.manual_seed(0)
    return torchvision.models.mobilenet_v2(weights=None, num_classes=10)


def tiny_dl(n=24, size=32, classes=2, bs=8):
    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.randn(n, 3, size, size, generator=g), torch.arange(n) % classes)
    return DataLoader(ds, batch_size=bs, shuffle=True, generator=g)


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


# ---------------------------------------------------------------- discriminative_param_groups
@pytest.mark.parametrize("make", [lambda: torchvision.models.mobilenet_v2(weights=None, num_classes=10),
                                  lambda: torchvision.models.resnet18(weights=None, num_classes=10)])
def test_param_groups_cover_every_trainable_parameter_once(make):
    model = make()
    groups = discriminative_param_groups(model, 1e-5, 1e-3)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters()}
    assert [g["name"] for g in groups] == [n for n, m in layer_groups(model) if any(True for _ in m.parameters())]
    lrs = np.array([g["lr"] for g in groups])
    assert math.isclose(lrs[0], 1e-5) and math.isclose(lrs[-1], 1e-3)
    assert np.allclose(np.diff(np.log(lrs)), np.log(100) / (len(lrs) - 1))
    torch.optim.AdamW(groups)  # accepted as is


def test_param_groups_skip_frozen_but_keep_their_rates(mnet):
    for p in mnet.features[:5].parameters(): p.requires_grad_(False)
    try:
        all_groups = discriminative_param_groups(mnet, 1e-5, 1e-3, include_frozen=True)
        trainable = discriminative_param_groups(mnet, 1e-5, 1e-3)
        rate = {g["name"]: g["lr"] for g in all_groups}
        assert all(math.isclose(g["lr"], rate[g["name"]]) for g in trainable)  # same rate per group
        ids = {id(p) for g in trainable for p in g["params"]}
        assert ids == {id(p) for p in mnet.parameters() if p.requires_grad}
    finally:
        for p in mnet.parameters(): p.requires_grad_(True)


def test_param_groups_options_are_copied(mnet):
    groups = discriminative_param_groups(mnet, 1e-4, 1e-3, weight_decay=0.0)
    assert all(g["weight_decay"] == 0.0 for g in groups)


def test_param_groups_explicit_groups_for_any_model():
    m = mlp()
    groups = discriminative_param_groups(m, 1e-4, 1e-2, groups=[("in", m[0]), ("act", m[1]), ("out", m[2])])
    assert [g["name"] for g in groups] == ["in", "out"]  # the ReLU has no parameters
    assert [g["lr"] for g in groups] == pytest.approx([1e-4, 1e-2])


def test_param_groups_bad_inputs(mnet):
    with pytest.raises(ValueError, match="swap them"):
        discriminative_param_groups(mnet, 1e-3, 1e-5)
    with pytest.raises(ValueError, match="must be a positive number"):
        discriminative_param_groups(mnet, 0, 1e-3)
    with pytest.raises(ValueError, match="lr_lo=True must be a finite number"):
        discriminative_param_groups(mnet, True, 1e-3)
    with pytest.raises(TypeError, match="layer_groups knows"):
        discriminative_param_groups(mlp(), 1e-5, 1e-3)
    m = mlp()
    with pytest.raises(ValueError, match="in no layer group"):
        discriminative_param_groups(m, 1e-5, 1e-3, groups=[m[0]])
    with pytest.raises(TypeError, match="nn.Modules or"):
        discriminative_param_groups(m, 1e-5, 1e-3, groups=["not a module"])


def test_param_groups_one_trainable_group_raises_instead_of_silently_using_one_rate(mnet):
    for p in mnet.features.parameters(): p.requires_grad_(False)
    try:
        with pytest.raises(ValueError, match=r"only one layer group \('head'\)"):
            discriminative_param_groups(mnet, 1e-5, 1e-3)
        assert len(discriminative_param_groups(mnet, 1e-3, 1e-3)) == 1
    finally:
        for p in mnet.parameters(): p.requires_grad_(True)


# ---------------------------------------------------------------- warmup_cosine
def lrs_of(opt, sched, n):
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"]); opt.step(); sched.step()
    return np.array(out)


def test_warmup_cosine_shape():
    opt = torch.optim.SGD(mlp().parameters(), lr=0.1)
    lrs = lrs_of(opt, warmup_cosine(opt, 5, 50), 50)
    assert lrs[0] == pytest.approx(0.001) and lrs[5] == pytest.approx(0.1)
    assert np.all(np.diff(lrs[:6]) > 0) and np.all(np.diff(lrs[5:]) < 0)
    # the cosine half: lr_t = 0.1 * (1 + cos(pi * t / 45)) / 2
    t = np.arange(45)
    assert np.allclose(lrs[5:], 0.1 * (1 + np.cos(np.pi * t / 45)) / 2, rtol=1e-6)


def test_warmup_cosine_without_warmup_is_plain_cosine():
    opt = torch.optim.SGD(mlp().parameters(), lr=0.1)
    lrs = lrs_of(opt, warmup_cosine(opt, 0, 20), 20)
    assert lrs[0] == pytest.approx(0.1) and lrs[10] == pytest.approx(0.05)


def test_warmup_cosine_bad_inputs():
    opt = torch.optim.SGD(mlp().parameters(), lr=0.1)
    with pytest.raises(ValueError, match="not shorter than total_steps"):
        warmup_cosine(opt, 100, 100)
    with pytest.raises(ValueError, match="not shorter than total_steps"):
        warmup_cosine(opt, 120, 100)
    with pytest.raises(ValueError, match="must be an integer >= 0; steps = batches"):
        warmup_cosine(opt, -1, 100)
    with pytest.raises(ValueError, match="warmup_steps=1.5 must be an integer; steps = batches"):
        warmup_cosine(opt, 1.5, 100)
    with pytest.raises(TypeError, match="must be a torch.optim.Optimizer"):
        warmup_cosine(mlp(), 1, 10)
    with pytest.raises(ValueError, match="start_factor"):
        warmup_cosine(opt, 1, 10, start_factor=0)


# ---------------------------------------------------------------- L2SP
def test_l2sp_zero_at_snapshot_and_quadratic(mnet):
    reg = L2SP(mnet, alpha=0.5, beta=0.0)
    assert reg.penalty(mnet).item() == 0.0
    w = mnet.features[3].conv[0][0].weight
    start = w.detach().clone()
    delta = torch.randn_like(w) * 1e-2
    try:
        with torch.no_grad(): w.copy_(start + delta)
        p1 = reg.penalty(mnet).item()
        assert p1 == pytest.approx(0.5 / 2 * delta.pow(2).sum().item(), rel=1e-5)
        for t in (2.0, 3.0):
            with torch.no_grad(): w.copy_(start + t * delta)
            assert reg.penalty(mnet).item() == pytest.approx(t ** 2 * p1, rel=1e-4)
    finally:
        with torch.no_grad(): w.copy_(start)


def test_l2sp_head_gets_plain_l2(mnet):
    reg = L2SP(mnet, alpha=1.0, beta=0.2)
    head_sq = sum(p.pow(2).sum() for p in head_module(mnet).parameters()).item()
    assert reg.penalty(mnet).item() == pytest.approx(0.1 * head_sq, rel=1e-5)
    assert set(reg.anchor) == {n for n, p in mnet.named_parameters() if not n.startswith("classifier")}


def test_l2sp_explicit_head_and_gradient():
    m = mlp()
    reg = L2SP(m, alpha=2.0, beta=0.0, head=m[2])
    with torch.no_grad(): m[0].weight += 1.0
    pen = reg.penalty(m); pen.backward()
    assert torch.allclose(m[0].weight.grad, torch.full_like(m[0].weight, 2.0))  # d/dw alpha/2 (w - w0)^2
    assert m[2].weight.grad is None or torch.all(m[2].weight.grad == 0)


def test_l2sp_keeps_weights_near_the_start_inside_fit():
    def train(alpha):
        seed_everything(0)
        m = mlp()
        start = {n: p.detach().clone() for n, p in m.named_parameters()}
        x = torch.randn(64, 4); y = (x[:, 0] > 0).long()
        fit(m, DataLoader(TensorDataset(x, y), batch_size=16), epochs=20, lr=1e-2, progress=False,
            callbacks=L2SP(m, alpha=alpha, beta=0.0, head=m[2]))
        return sum((p - start[n]).pow(2).sum().item() for n, p in m.named_parameters() if n.startswith("0."))
    assert train(alpha=10.0) < 0.5 * train(alpha=0.0)


def test_l2sp_logs_its_mean_penalty():
    seed_everything(0)
    m = mlp()
    x = torch.randn(32, 4); y = (x[:, 0] > 0).long()
    h = fit(m, DataLoader(TensorDataset(x, y), batch_size=8), epochs=2, progress=False,
            callbacks=L2SP(m, alpha=1.0, head=m[2]))
    assert "l2sp" in h.columns and all(v >= 0 for v in h["l2sp"])


def test_l2sp_bad_inputs():
    m = mlp()
    reg = L2SP(m, alpha=1.0, head=m[2])
    m[0] = nn.Linear(3, 8)  # surgery after the snapshot: same name, new shape
    with pytest.raises(ValueError, match="after changing the model"):
        reg.penalty(m)
    with pytest.raises(ValueError, match="must be a number >= 0"):
        L2SP(m, alpha=-0.1, head=m[2])
    with pytest.raises(ValueError, match="beta=inf must be a finite number"):
        L2SP(m, alpha=1.0, beta=float("inf"), head=m[2])
    other = nn.Sequential(nn.Linear(4, 2))
    reg2 = L2SP(mlp(), alpha=1.0, head=nn.Linear(1, 1))
    with pytest.raises(ValueError, match="no longer has"):
        fit(other, DataLoader(TensorDataset(torch.randn(8, 4), torch.zeros(8, dtype=torch.long)), batch_size=4),
            progress=False, callbacks=reg2)


# ---------------------------------------------------------------- head features, train_head, with_head
def test_head_on_features_equals_model_output(mnet):
    mnet.eval()
    x = torch.randn(4, 3, 32, 32)
    f, y = head_features(mnet, DataLoader(TensorDataset(x, torch.arange(4)), batch_size=3))
    assert f.shape == (4, 1280) and torch.equal(y, torch.arange(4))
    with torch.no_grad(): assert torch.allclose(head_module(mnet)(f), mnet(x), atol=1e-4)


def test_train_head_moves_only_the_head():
    seed_everything(0)
    m = torchvision.models.resnet18(weights=None, num_classes=2)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    h = train_head(m, tiny_dl(), tiny_dl(), epochs=2, lr=1e-2)
    assert len(h) == 2 and "accuracy" in h.columns
    changed = {k for k, v in m.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"fc.weight", "fc.bias"}
    with pytest.raises(ValueError, match="must be a positive number"):
        train_head(m, tiny_dl(), lr=0)


def test_with_head_copies_and_leaves_the_model_alone(mnet):
    new_head = nn.Sequential(nn.Dropout(0.0), nn.Linear(1280, 3))
    probe = with_head(mnet, new_head)
    assert probe.classifier[1].out_features == 3 and mnet.classifier[1].out_features == 10
    assert probe.classifier[1] is not new_head[1]
    assert probe(torch.zeros(1, 3, 32, 32)).shape == (1, 3)


def test_forgetting_of_a_model_against_itself():
    torch.manual_seed(0)
    m = torchvision.models.mobilenet_v2(weights=None).eval()
    imgs = [np.random.default_rng(i).integers(0, 255, (40, 50, 3), dtype=np.uint8) for i in range(3)]
    res = forgetting(m, m, imgs)
    assert (res["kept"], res["total"]) == (3, 3) and res["drift"] == pytest.approx(0.0, abs=1e-5)
    with pytest.raises(ValueError, match="images is empty"):
        forgetting(m, m, [])


def test_forgetting_labels_are_the_full_models_top1():
    from tltutor.backbones import to_chw, weights_meta
    torch.manual_seed(0)
    m, other = torchvision.models.mobilenet_v2(weights=None).eval(), torchvision.models.mobilenet_v2(weights=None).eval()
    imgs = [np.random.default_rng(i).integers(0, 255, (40, 50, 3), dtype=np.uint8) for i in range(3)]
    meta = weights_meta("mobilenet_v2")
    x = torch.stack([meta["transforms"](to_chw(im)) for im in imgs])
    top1 = lambda net: [meta["categories"][i] for i in net(x).argmax(1).tolist()]
    res = forgetting(other, m, imgs)      # one forward pass per network, the ImageNet head read on both
    with torch.no_grad():
        assert res["before"] == top1(m) and res["after"] == top1(with_head(other, m.classifier).eval())


def test_forgetting_with_a_precomputed_reference_is_the_same():
    from tltutor.finetune import photo_reference
    torch.manual_seed(0)
    m, other = torchvision.models.mobilenet_v2(weights=None).eval(), torchvision.models.mobilenet_v2(weights=None).eval()
    imgs = [np.random.default_rng(i).integers(0, 255, (40, 50, 3), dtype=np.uint8) for i in range(3)]
    ref = photo_reference(m, imgs)
    assert ref["features"].shape == (3, 1280) and len(ref["before"]) == 3
    plain, fast = forgetting(other, m, imgs), forgetting(other, m, imgs, reference=ref)
    assert plain == fast                               # bit for bit: the same passes, the original's done once
    with pytest.raises(ValueError, match="computed on 3 images"):
        forgetting(other, m, imgs[:2], reference=ref)
    with pytest.raises(TypeError, match="photo_reference"):
        forgetting(other, m, imgs, reference={"x": 1})
    with pytest.raises(ValueError, match="images is empty"):
        photo_reference(m, [])
    chunked = forgetting(other, m, imgs, reference=photo_reference(m, imgs, batch_size=2))   # two passes: 2 + 1
    assert chunked["before"] == plain["before"] and chunked["drift"] == pytest.approx(plain["drift"], abs=1e-5)
    with pytest.raises(ValueError, match="positive integer"):
        photo_reference(m, imgs, batch_size=0)


# ---------------------------------------------------------------- fine_tune, StepLog
def test_fine_tune_recipe_runs_both_phases():
    seed_everything(0)
    m = torchvision.models.mobilenet_v2(weights=None, num_classes=2)
    for p in m.features.parameters(): p.requires_grad_(False)   # fine_tune unfreezes
    log = StepLog()
    h = fine_tune(m, tiny_dl(), tiny_dl(), epochs=2, freeze_epochs=1, lr=1e-3, l2sp=L2SP(m, alpha=0.1),
                  callbacks=[log], progress=False)
    assert h["phase"] == ["head", "all", "all"] and h["epoch"] == [1, 2, 3]
    assert all(p.requires_grad for p in m.parameters())
    assert len(log.losses) == 2 * 3 and log.lrs[0] < log.lrs[1]  # 10% warmup of 6 steps: 1 step
    assert h[-1]["l2sp"] > 0


def test_fine_tune_one_rate_no_warmup():
    seed_everything(0)
    m = torchvision.models.mobilenet_v2(weights=None, num_classes=2)
    log = StepLog()
    h = fine_tune(m, tiny_dl(), epochs=1, freeze_epochs=0, lr=1e-3, div=1, warmup=0, callbacks=[log], progress=False)
    assert h["phase"] == ["all"] and log.lrs[0] == pytest.approx(1e-3)


def test_fine_tune_prepare_freeze_bn_keeps_batchnorm():
    from tltutor.freeze import freeze_bn
    seed_everything(0)
    m = torchvision.models.mobilenet_v2(weights=None, num_classes=2)
    for p in m.features.parameters(): p.requires_grad_(False)   # fine_tune unfreezes, then prepare re-freezes BN
    bns = [b for b in m.modules() if isinstance(b, nn.BatchNorm2d)]
    before = [{k: v.clone() for k, v in b.state_dict().items()} for b in bns]
    conv = m.features[0][0].weight.detach().clone()
    seen = []
    fine_tune(m, tiny_dl(), epochs=1, freeze_epochs=0, lr=1e-2, div=1, warmup=0, progress=False,
              prepare=lambda model: seen.append(freeze_bn(model)))
    assert seen == [m]
    for b, s0 in zip(bns, before):
        assert not b.training and not any(p.requires_grad for p in b.parameters())
        assert all(torch.equal(v, s0[k]) for k, v in b.state_dict().items())   # statistics, weight, bias untouched
    assert not torch.equal(m.features[0][0].weight, conv)                       # the convolutions trained
    bn_ids = {id(p) for b in bns for p in b.parameters()}
    assert all(p.requires_grad for p in m.parameters() if id(p) not in bn_ids)  # everything else was unfrozen


@pytest.mark.parametrize("kw, msg", [(dict(freeze_epochs=-1), "freeze_epochs"), (dict(epochs=0), "positive integer"),
                                     (dict(div=0.5), "div="), (dict(warmup=1.0), "fraction of the steps"),
                                     (dict(lr=-1e-3), "positive number"), (dict(l2sp=0.1), "must be an L2SP"),
                                     (dict(prepare="freeze_bn"), "prepare must be a function")])
def test_fine_tune_bad_inputs(kw, msg):
    m = torchvision.models.mobilenet_v2(weights=None, num_classes=2)
    with pytest.raises((ValueError, TypeError), match=msg):
        fine_tune(m, tiny_dl(), progress=False, **kw)


def test_steplog_stops_after_max_steps():
    log = StepLog(max_steps=2)
    h = fit(mlp(), DataLoader(TensorDataset(torch.randn(40, 4), torch.zeros(40, dtype=torch.long)), batch_size=4),
            epochs=3, callbacks=log, progress=False)
    assert len(log.losses) == 2 and len(h) == 1
    with pytest.raises(ValueError, match="positive integer"):
        StepLog(max_steps=0)
