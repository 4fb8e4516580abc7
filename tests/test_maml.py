"""tltutor.maml: functional MAML / FOMAML / ANIL on torch.func. Tiny synthetic models in float64, no glyphs, no network."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.utils.data import TensorDataset

from tltutor.core import seed_everything
from tltutor.fewshot import EpisodeSampler, conv4, evaluate_episodes
from tltutor.maml import (MAML, BatchStatsNorm, TaskBatchSampler, batch_stats_only, check_functional, evaluate_maml,
                          inner_adapt, maml_step, meta_batch_cost, train_maml)


def tiny_net():
    torch.manual_seed(0)
    return batch_stats_only(nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                                          nn.Linear(4 * 6 * 6, 3))).double()


def task_batch(tasks=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tasks, 15, 1, 8, 8, generator=g, dtype=torch.double)
    return (x, torch.arange(3).repeat(tasks, 2)), torch.arange(3).repeat_interleave(3).repeat(tasks)


def grads(loss, model): return torch.autograd.grad(loss, list(model.parameters()))


def close(a, b, tol):
    for u, v in zip(a, b): assert torch.allclose(u, v, atol=tol, rtol=0), (u - v).abs().max()


def reference_meta_grad(model, batch, steps, lr, first_order):
    "Hand-written per-task loop with torch.autograd.grad(create_graph=True): the textbook MAML meta-gradient."
    (x, ys), yq = batch
    names, theta = zip(*model.named_parameters())
    total, yq = 0.0, yq.reshape(len(x), -1)
    for xt, yst, yqt in zip(x, ys, yq):
        w = list(theta)
        for _ in range(steps):
            loss = F.cross_entropy(functional_call(model, dict(zip(names, w)), (xt[:len(yst)],)), yst)
            w = [p - lr * g for p, g in zip(w, torch.autograd.grad(loss, w, create_graph=not first_order))]
        total = total + F.cross_entropy(functional_call(model, dict(zip(names, w)), (xt[len(yst):],)), yqt)
    return torch.autograd.grad(total / len(x), theta)


@pytest.mark.parametrize("steps", [1, 3])
def test_second_order_matches_hand_written_loop(steps):
    net, batch = tiny_net(), task_batch()
    for vmap in (False, True):
        got = grads(maml_step(MAML(net, steps=steps, lr=0.3, vmap=vmap), batch), net)
        close(got, reference_meta_grad(net, batch, steps, 0.3, first_order=False), 1e-5)


def test_first_order_is_query_gradient_at_adapted_weights():
    net, ((x, ys), yq) = tiny_net(), task_batch(tasks=1)
    theta = dict(net.named_parameters())
    fast = {k: v.detach().requires_grad_() for k, v in
            inner_adapt(net, theta, (x[0, :6], ys[0]), steps=2, lr=0.3, first_order=True).items()}
    at_adapted = torch.autograd.grad(F.cross_entropy(functional_call(net, fast, (x[0, 6:],)), yq), list(fast.values()))
    got = grads(maml_step(MAML(net, steps=2, lr=0.3, first_order=True), ((x, ys), yq)), net)
    close(got, at_adapted, 1e-10)
    # ...and it differs from the second-order meta-gradient
    second = grads(maml_step(MAML(net, steps=2, lr=0.3), ((x, ys), yq)), net)
    assert max((a - b).abs().max() for a, b in zip(got, second)) > 1e-6


@pytest.mark.parametrize("kw", [dict(), dict(first_order=True), dict(anil=True)])
def test_vmap_and_loop_give_the_same_gradients(kw):
    net, batch = tiny_net(), task_batch(tasks=4)
    a = grads(maml_step(MAML(net, steps=2, lr=0.3, vmap=False, **kw), batch), net)
    b = grads(maml_step(MAML(net, steps=2, lr=0.3, vmap=True, **kw), batch), net)
    close(a, b, 1e-10)


def test_zero_inner_steps_is_plain_training():
    net, batch = tiny_net(), task_batch()
    (x, ys), yq = batch
    plain = F.cross_entropy(torch.cat([net(xt[6:]) for xt in x]), yq)
    close(grads(maml_step(MAML(net, steps=0), batch), net), grads(plain, net), 1e-12)


def test_anil_adapts_only_the_head_but_trains_the_body():
    net, batch = tiny_net(), task_batch()
    (x, ys), _ = batch
    theta = dict(net.named_parameters())
    head = {k[2:]: v for k, v in theta.items() if k.startswith("4.")}
    fast = inner_adapt(net[-1], head, (net[:-1](x[0]).detach()[:6], ys[0]), steps=1)
    assert set(fast) == {"weight", "bias"}
    g = grads(maml_step(MAML(net, anil=True), batch), net)
    assert g[0].abs().sum() > 0                                    # the body gets a meta-gradient


def test_batch_stats_norm_matches_torch_in_training_mode():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(5)
    nn.init.normal_(bn.weight); nn.init.normal_(bn.bias)
    x = torch.randn(7, 5, 3, 3) * 2 + 1
    ours = batch_stats_only(nn.Sequential(bn))[0]
    assert isinstance(ours, BatchStatsNorm) and ours.weight is bn.weight
    assert torch.allclose(ours.eval()(x), F.batch_norm(x, None, None, bn.weight, bn.bias, training=True), atol=1e-5)
    assert list(batch_stats_only(conv4(hidden=8)).buffers()) == []


def test_bad_models():
    with pytest.raises(ValueError, match=r"call batch_stats_only\(model\) first"):
        MAML(conv4(hidden=8, num_classes=5))

    class Stale(nn.Module):
        def __init__(self):
            super().__init__()
            self.raw = nn.Parameter(torch.zeros(2))
            self.scale = self.raw.exp()                  # a tensor derived from a parameter, not a leaf of the module
        def forward(self, x): return x * self.scale

    with pytest.raises(ValueError, match="computed from the parameters"):
        check_functional(Stale())
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        MAML(frozen)
    with pytest.raises(TypeError, match=r"nn.Sequential\(body, head\)"):
        MAML(nn.Linear(2, 2), anil=True)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        MAML("conv4")


def test_bad_inputs():
    net, batch = tiny_net(), task_batch()
    (x, ys), yq = batch
    theta = dict(net.named_parameters())
    with pytest.raises(ValueError, match="steps=-1 must be an integer >= 0"):
        inner_adapt(net, theta, (x[0, :6], ys[0]), steps=-1)
    with pytest.raises(ValueError, match="lr=0 must be a positive number"):
        MAML(net, lr=0)
    with pytest.raises(ValueError, match="6 inputs but 5 labels"):
        inner_adapt(net, theta, (x[0, :6], ys[0, :5]))
    with pytest.raises(ValueError, match=r"query labels \[3\] have no support example"):
        maml_step(MAML(net), ((x, ys), yq + 1))            # support/query label mismatch
    with pytest.raises(ValueError, match="query labels do not match"):
        maml_step(MAML(net), ((x, ys), yq[:-2]))
    with pytest.raises(TypeError, match="needs the support labels"):
        MAML(net)(x)
    with pytest.raises(TypeError, match=r"use MAML\(model\)"):
        maml_step(net, batch)


def blobs(seed=0):
    seed_everything(seed)
    y = torch.arange(6).repeat_interleave(20)
    x = 3 * torch.randn(6, 8)[y] + torch.randn(120, 8)
    ds = TensorDataset(x, y)
    ds.x, ds.y = x, y
    return ds


def test_task_batches_train_through_fit_and_evaluate_like_evaluate_episodes():
    ds = blobs()
    s = TaskBatchSampler(EpisodeSampler(ds, 3, 1, 4, episodes=8, seed=0), tasks=4)
    (x, ys), yq = next(iter(s.loader(ds)))
    assert x.shape == (4, 15, 8) and ys.shape == (4, 3) and yq.shape == (48,) and len(s) == 2
    held = next(iter(TaskBatchSampler(EpisodeSampler(ds, 3, 1, 4, episodes=32, seed=5), tasks=32).loader(ds)))
    m = MAML(nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3)), steps=1, lr=0.5)
    before = maml_step(m, held).item()
    h = train_maml(m, ds, n_way=3, k_shot=1, n_query=4, tasks=4, meta_batches=60, epochs=3, lr=3e-3, progress=False)
    assert len(h) == 3 and maml_step(m, held).item() < 0.6 * before
    m.eval()
    chunked = evaluate_maml(m, ds, 3, 1, episodes=30, n_query=4, seed=2, chunk=7)
    one = evaluate_episodes(None, ds, 3, 1, episodes=30, n_query=4, seed=2,
                            episode_fn=lambda xs, ys, xq: m(torch.cat([xs, xq]), ys))
    assert torch.allclose(chunked.per_episode, one.per_episode)
    with pytest.raises(ValueError, match=r"tasks=9 must be an integer in \[1, 8\]"):
        TaskBatchSampler(s.episodes, tasks=9)
    with pytest.raises(ValueError, match="too few for a confidence interval"):
        evaluate_maml(m, ds, 3, 1, episodes=1)
    cost = meta_batch_cost(m, held, repeats=1)
    assert cost["seconds"] > 0 and all(p.grad is None for p in m.parameters())


def test_native_norm_gives_the_same_outputs_and_switches_back():
    from tltutor.maml import native_norm
    torch.manual_seed(0)
    bn = BatchStatsNorm(4)
    nn.init.normal_(bn.weight); nn.init.normal_(bn.bias)
    x = torch.randn(6, 4, 5, 5) * 2 + 1
    plain = bn(x)
    with native_norm():
        assert BatchStatsNorm.native
        assert torch.allclose(bn(x), plain, atol=1e-5)
    assert not BatchStatsNorm.native


def test_steps_tuple_returns_logits_along_one_adaptation():
    net, batch = tiny_net(), task_batch()
    (x, ys), _ = batch
    m = MAML(net, steps=1, lr=0.3).eval()
    with torch.no_grad():
        along = m(x, ys, steps=(0, 2, 3))
        assert along.shape == (3, 27, 3)
        for i, s in enumerate((0, 2, 3)):
            assert torch.allclose(along[i], m(x, ys, steps=s), atol=1e-12)
    with pytest.raises(ValueError, match="increasing sequence"):
        m(x, ys, steps=(2, 2))
    ds = blobs()
    mlp = MAML(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)), lr=0.5)
    curve = evaluate_maml(mlp, ds, 3, 1, episodes=12, n_query=4, seed=3, steps=(0, 1, 4))
    assert list(curve) == [0, 1, 4]
    assert torch.allclose(curve[4].per_episode, evaluate_maml(mlp, ds, 3, 1, episodes=12, n_query=4, seed=3, steps=4).per_episode)
