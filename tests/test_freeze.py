"""tltutor.freeze: group lookup, freeze/unfreeze round trips, BatchNorm locks that survive model.train(), optimizer
rebuilding, gradual unfreezing, and the frozen-prefix cache (exactness and bad inputs).

Uses randomly initialised torchvision models (no weight files needed) and tiny tensors, so it runs in seconds."""
import copy
import pickle

import pytest
import torch
import torchvision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tltutor.backbones import layer_groups
from tltutor.core import Callback, check_optimizer, fit, seed_everything
from tltutor.freeze import (GradualUnfreezing, PrefixCache, bn_drift, cache_frozen_prefix, freeze,
                            freeze_bn, group_index, optimizer_for, trainable, unfreeze, unfreeze_bn)


def mnet(classes=4):
    torch.manual_seed(0)
    return torchvision.models.mobilenet_v2(weights=None, num_classes=classes)


def resnet(classes=4):
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None, num_classes=classes)


def images(n=8, size=32, classes=4):
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 3, size, size, generator=g), torch.arange(n) % classes)


def flags(model):
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    locked = [any(type(h).__name__ == "_KeepEval" for h in b._forward_pre_hooks.values()) for b in bns]
    return [p.requires_grad for p in model.parameters()], locked


def bn_stats(model):
    return torch.cat([torch.cat([m.running_mean, m.running_var]) for m in model.modules() if isinstance(m, nn.BatchNorm2d)])


# ---------------------------------------------------------------- group_index
def test_group_index_names_and_indices():
    m = mnet()
    assert group_index(m, "stem") == 0 and group_index(m, "head") == 9 and group_index(m, -2) == 8
    assert group_index(resnet(), "stage4") == 4


@pytest.mark.parametrize("key, err, msg", [("stage9", ValueError, "'final_conv', 'head'"),
                                           (10, ValueError, "beyond the last group"),
                                           (-11, ValueError, "beyond the last group"),
                                           (1.5, TypeError, "integer index"), (True, TypeError, "integer index")])
def test_group_index_bad_keys(key, err, msg):
    with pytest.raises(err, match=msg): group_index(mnet(), key)


# ---------------------------------------------------------------- freeze / unfreeze
@pytest.mark.parametrize("make", [mnet, resnet])
def test_freeze_sets_exactly_the_prefix(make):
    m = make()
    freeze(m, upto=2)
    for i, (_, g) in enumerate(layer_groups(m)):
        assert all(p.requires_grad == (i > 2) for p in g.parameters())


@pytest.mark.parametrize("make", [mnet, resnet])
def test_freeze_unfreeze_round_trips_restore_flags_exactly(make):
    m = make()
    start = flags(m)
    unfreeze(freeze(m, upto=-2), from_=0)
    assert flags(m) == start
    freeze(m, upto=1); mid = flags(m)
    unfreeze(freeze(m, upto=-2), from_=2)
    assert flags(m) == mid


def test_round_trip_keeps_a_hand_frozen_bn_flag():
    m = mnet()
    m.features[0][1].weight.requires_grad_(False)          # a choice made by hand before freeze_bn
    start = flags(m)
    unfreeze_bn(freeze_bn(m))
    assert flags(m) == start


def test_freeze_bn_locks_survive_freeze_and_unfreeze():
    m = freeze_bn(mnet())
    locked = flags(m)
    unfreeze(freeze(m, upto="stage6"))
    assert flags(m) == locked
    unfreeze_bn(m)
    assert all(p.requires_grad for p in m.parameters())


def test_unfreeze_then_unfreeze_bn_in_either_order():
    a, b = mnet(), mnet()
    freeze(a, upto=3); freeze_bn(a); unfreeze(a); unfreeze_bn(a)
    freeze(b, upto=3); freeze_bn(b); unfreeze_bn(b); unfreeze(b)
    assert flags(a) == flags(b) == flags(mnet())


# ---------------------------------------------------------------- BatchNorm locks
def test_freeze_bn_stats_do_not_change_after_train():
    m = freeze_bn(mnet()).train()
    x = torch.randn(4, 3, 32, 32)
    before = bn_stats(m).clone()
    out = m(x)
    assert torch.equal(bn_stats(m), before)
    assert not any(p.requires_grad for b in m.modules() if isinstance(b, nn.BatchNorm2d) for p in b.parameters())
    m.classifier[0].p = 0.0                                 # no dropout, so train and eval outputs are comparable
    with torch.no_grad(): assert torch.allclose(m.train()(x), m.eval()(x), atol=1e-5)


def test_without_freeze_bn_stats_move_even_with_requires_grad_false():
    m = mnet()
    for p in m.parameters(): p.requires_grad_(False)       # the classic bug: frozen weights, moving statistics
    m.train()
    before = bn_stats(m).clone()
    with torch.no_grad(): m(torch.randn(4, 3, 32, 32))
    assert not torch.equal(bn_stats(m), before)


def test_freeze_bn_false_leaves_statistics_free():
    m = freeze(mnet(), upto="stage3", bn=False).train()
    before = bn_stats(m).clone()
    with torch.no_grad(): m(torch.randn(4, 3, 32, 32))
    assert not torch.equal(bn_stats(m), before)


def test_locked_model_copies_and_pickles():
    m = freeze_bn(mnet())
    for other in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        other.train()
        before = bn_stats(other).clone()
        with torch.no_grad(): other(torch.randn(2, 3, 32, 32))
        assert torch.equal(bn_stats(other), before)


def test_freeze_bn_bad_input():
    with pytest.raises(TypeError, match="torch.nn.Module"): freeze_bn("mobilenet_v2")
    with pytest.raises(TypeError, match="torch.nn.Module"): unfreeze_bn(None)


# ---------------------------------------------------------------- trainable
def test_trainable_table():
    m = freeze(mnet(), upto="stage5")
    t = trainable(m)
    rows = {r["group"]: r for r in t.rows}
    assert rows["stage5"]["trainable"] == "no" and rows["stage5"]["frozen_bn"] == "9/9"
    assert rows["stage6"]["trainable"] == "yes" and rows["stage6"]["frozen_bn"] == "0/9"
    assert rows["head"]["frozen_bn"] == "-"
    assert sum(r["trainable_params"] for r in t.rows) == sum(p.numel() for p in m.parameters() if p.requires_grad)
    assert str(t).splitlines()[0] == "MobileNetV2: 10 groups"               # the same table as backbones.summary
    assert str(t).splitlines()[1].split() == ["group", "params", "trainable_params", "trainable", "frozen_bn"]
    assert str(t).splitlines()[-1].startswith("total")


# ---------------------------------------------------------------- fit with nothing trainable
def test_fit_on_a_fully_frozen_model_says_so():
    m = freeze(mnet(), upto="head")
    with pytest.raises(ValueError, match="no trainable parameters"):
        fit(m, DataLoader(images(), batch_size=4), progress=False)


# ---------------------------------------------------------------- optimizers
def test_optimizer_built_before_unfreezing_is_caught_and_fixed():
    seed_everything(0)
    m = freeze(mnet())
    opt = optimizer_for(m)                                  # head only
    unfreeze(m, from_="final_conv")
    w0 = m.features[-1][0].weight.detach().clone()
    for x, y in DataLoader(images(), batch_size=4):        # a plain training loop does not notice ...
        opt.zero_grad(); torch.nn.functional.cross_entropy(m.train()(x), y).backward(); opt.step()
    assert torch.equal(m.features[-1][0].weight, w0)        # never moved: not in the optimizer
    with pytest.raises(ValueError, match="built before they were unfrozen"): check_optimizer(opt, m)
    with pytest.raises(ValueError, match="built before they were unfrozen"):  # ... fit does
        fit(m, DataLoader(images(), batch_size=4), opt=opt, progress=False, metrics=None)
    new = check_optimizer(optimizer_for(m, 1e-4, 1e-3, old=opt), m)
    head_w = m.classifier[1].weight
    assert new.state[head_w]["exp_avg"] is opt.state[head_w]["exp_avg"]
    assert [g["name"] for g in new.param_groups] == ["final_conv", "head"]
    assert new.param_groups[0]["lr"] == pytest.approx(1e-4 * 10 ** (8 / 9))


def test_optimizer_for_bad_inputs():
    with pytest.raises(ValueError, match="no trainable parameters"): optimizer_for(freeze(mnet(), upto="head"))
    with pytest.raises(ValueError, match="swap them"): optimizer_for(mnet(), 1e-3, 1e-5)
    with pytest.raises(TypeError, match="torch optimizer"): optimizer_for(mnet(), old="adam")


# ---------------------------------------------------------------- GradualUnfreezing
class Count(Callback):
    order = 1
    def __init__(self): self.groups = []
    def before_epoch(self, state): self.groups.append([g["name"] for g in state.opt.param_groups])


def test_gradual_unfreezing_schedule_and_optimizer():
    seed_everything(0)
    m, c = mnet(), Count()
    stem0 = m.features[0][0].weight.detach().clone()
    h = fit(m, DataLoader(images(), batch_size=4), epochs=4, progress=False, metrics=None,
            callbacks=[GradualUnfreezing(every=2, start=1, step=2), c])
    assert h["unfrozen"] == [1, 1, 3, 3]
    assert c.groups == [["head"], ["head"], ["stage7", "final_conv", "head"], ["stage7", "final_conv", "head"]]
    assert torch.equal(m.features[0][0].weight, stem0)
    assert GradualUnfreezing(start=2, step=3).unfrozen_at(5, 10) == 10


def test_gradual_unfreezing_bad_inputs():
    with pytest.raises(ValueError, match="positive integer"): GradualUnfreezing(every=0)
    with pytest.raises(ValueError, match="positive integer"): GradualUnfreezing(step=1.5)
    m = mnet()
    with pytest.raises(ValueError, match="only 10 layer groups"):
        fit(m, DataLoader(images(), batch_size=4), callbacks=GradualUnfreezing(start=11), progress=False)
    opt = torch.optim.AdamW(m.parameters())
    with pytest.raises(ValueError, match="sched=None"):
        fit(m, DataLoader(images(), batch_size=4), opt=opt, sched=torch.optim.lr_scheduler.StepLR(opt, 1),
            callbacks=GradualUnfreezing(), progress=False)


# ---------------------------------------------------------------- cache_frozen_prefix
@pytest.mark.parametrize("make, cut", [(mnet, "stage5"), (mnet, "final_conv"), (resnet, "stage2"), (resnet, "stage4")])
def test_cache_is_exact(make, cut):
    m = freeze(make(), upto=cut).eval()
    ds = images()
    c = cache_frozen_prefix(m, ds, batch_size=3)
    assert isinstance(c, PrefixCache) and len(c) == len(ds)
    with torch.no_grad(): assert torch.allclose(c.top.eval()(c.dataset.tensors[0]), m(ds.tensors[0]), atol=1e-5)
    assert torch.equal(c.dataset.tensors[1], ds.tensors[1])


def test_chained_cache_equals_direct_cache():
    m = freeze(mnet(), upto="stage5")
    ds = images()
    c5 = cache_frozen_prefix(m, ds)
    freeze(m, upto="final_conv")
    chained, direct = cache_frozen_prefix(m, c5), cache_frozen_prefix(m, ds)
    assert chained.start == "head" and chained.dataset.tensors[0].shape == (8, 1280)
    assert torch.allclose(chained.dataset.tensors[0], direct.dataset.tensors[0], atol=1e-5)
    sub = c5.subset([1, 2])
    assert torch.equal(sub.dataset.tensors[0], c5.dataset.tensors[0][[1, 2]]) and sub.top is c5.top


def test_training_on_the_cache_equals_training_the_network():
    seed_everything(0)
    a = freeze(mnet(), upto="stage6")
    b = copy.deepcopy(a)
    ds = images(12)
    c = cache_frozen_prefix(b, ds)
    seed_everything(1); fit(a, DataLoader(ds, batch_size=4), epochs=2, progress=False, metrics=None)
    seed_everything(1); fit(c.top, DataLoader(c.dataset, batch_size=4), epochs=2, progress=False, metrics=None)
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(p, q, atol=1e-5), n
    assert torch.allclose(bn_stats(a), bn_stats(b), atol=1e-5)   # the unfrozen BN layers trained identically too


def test_gradual_unfreezing_on_a_cached_top():
    # a PrefixCache top names its own layer groups, so the schedule runs on it alone; the cached prefix stays frozen
    seed_everything(0)
    m, cnt = freeze(mnet(), upto="stage5"), Count()
    c = cache_frozen_prefix(m, images())
    assert [n for n, _ in layer_groups(c.top)] == ["stage6", "stage7", "final_conv", "head"]
    prefix = [p for n, g in layer_groups(m)[:6] for p in g.parameters()]            # stem..stage5
    before = [p.detach().clone() for p in prefix]
    stage6 = dict(layer_groups(m))["stage6"][0].conv[0][0].weight
    stage6_0 = stage6.detach().clone()
    h = fit(c.top, DataLoader(c.dataset, batch_size=4), epochs=4, progress=False, metrics=None,
            callbacks=[GradualUnfreezing(every=1, start=1, step=1), cnt])
    assert h["unfrozen"] == [1, 2, 3, 4]
    assert cnt.groups[-1] == ["stage6", "stage7", "final_conv", "head"]
    assert all(torch.equal(p, q) for p, q in zip(prefix, before)) and not any(p.requires_grad for p in prefix)
    assert not torch.equal(stage6, stage6_0)                      # released in the last epoch, it trained in place


def test_cache_bad_inputs():
    ds = images()
    m = mnet()
    with pytest.raises(ValueError, match=r"freeze\(model, upto=...\) first"): cache_frozen_prefix(m, ds)
    with pytest.raises(ValueError, match="unfreeze the top first"): cache_frozen_prefix(freeze(mnet(), upto="head"), ds)
    with pytest.raises(ValueError, match="would still update"): cache_frozen_prefix(freeze(mnet(), upto=3, bn=False), ds)
    f = freeze(mnet(), upto=3)
    with pytest.raises(TypeError, match="pass dl.dataset"): cache_frozen_prefix(f, DataLoader(ds))
    with pytest.raises(TypeError, match="PrefixCache"): cache_frozen_prefix(f, torch.zeros(2, 3, 32, 32))
    with pytest.raises(ValueError, match="positive integer"): cache_frozen_prefix(f, ds, batch_size=0)
    other = cache_frozen_prefix(freeze(mnet(), upto=3), ds)
    with pytest.raises(ValueError, match="another model"): cache_frozen_prefix(f, other)
    high = cache_frozen_prefix(freeze(f, upto=6), ds)
    unfreeze(f, from_=4)
    with pytest.raises(ValueError, match="cache from the images"): cache_frozen_prefix(f, high)


# ---------------------------------------------------------------- bn_drift
def test_bn_drift():
    ref = mnet()
    m = copy.deepcopy(ref)
    assert bn_drift(m, ref) == 0.0
    with torch.no_grad():
        for _ in range(5): m.train()(torch.randn(4, 3, 32, 32) * 3 + 1)
    assert bn_drift(m, ref) > 0.1
    with pytest.raises(ValueError, match="two copies of one architecture"): bn_drift(m, nn.Linear(2, 2))
