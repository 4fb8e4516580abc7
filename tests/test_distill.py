"""tltutor.distill: the numerical identities of the KD loss (alpha=1 is CE, identical logits give a zero KL term,
the T^2 scaling of the soft gradient), cross-checks against a by-hand KL, the cached-teacher dataset and the `fit`
callback, and the bad inputs (T <= 0, alpha outside [0, 1], shapes that disagree, a teacher left in train mode).

Tiny tensors only: runs in a few seconds, no data or weights needed."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tltutor.core import fit
from tltutor.distill import Distill, cache_teacher, feature_kd_loss, kd_loss, softmax_t
from tltutor.finetune import StepLog


def logits(n=16, c=5, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, generator=g) * scale, torch.randn(n, c, generator=g) * scale, torch.randint(c, (n,), generator=g)


# ---------------------------------------------------------------- softmax_t
def test_softmax_t_rows_sum_to_one_and_keep_order():
    s, _, _ = logits()
    for T in (0.5, 1, 3, 50):
        p = softmax_t(s, T)
        torch.testing.assert_close(p.sum(1), torch.ones(len(s)))
        assert torch.equal(p.argmax(1), s.argmax(1))
    assert (softmax_t(s, 10).max(1).values < softmax_t(s, 1).max(1).values).all()   # hotter = flatter


@pytest.mark.parametrize("T", [0, -1, float("inf"), float("nan"), "4", True])
def test_bad_temperature(T):
    s, t, y = logits()
    with pytest.raises(ValueError, match=r"T=.* must be a (positive|finite) number; the temperature"): softmax_t(s, T)
    with pytest.raises(ValueError, match=r"T=.* must be a (positive|finite) number; the temperature"): kd_loss(s, t, y, T=T)
    with pytest.raises(ValueError, match=r"T=.* must be a (positive|finite) number; the temperature"): Distill(T=T)


# ---------------------------------------------------------------- kd_loss identities
def test_alpha_one_is_cross_entropy():
    s, t, y = logits()
    for T in (1, 4):
        torch.testing.assert_close(kd_loss(s, t, y, T=T, alpha=1.0), F.cross_entropy(s, y))


def test_identical_logits_have_zero_kl():
    s, _, y = logits()
    for T in (1, 2, 8):
        assert abs(kd_loss(s, s.clone(), T=T, alpha=0.0).item()) < 1e-6
        torch.testing.assert_close(kd_loss(s, s.clone(), y, T=T, alpha=0.3), 0.3 * F.cross_entropy(s, y))


def test_soft_term_matches_by_hand_kl():
    s, t, _ = logits()
    T = 3.0
    p, q = softmax_t(t, T), softmax_t(s, T)
    by_hand = (p * (p.log() - q.log())).sum(1).mean() * T * T
    torch.testing.assert_close(kd_loss(s, t, T=T, alpha=0.0), by_hand)


@pytest.mark.parametrize("T", [1.0, 2.0, 4.0, 8.0])
def test_soft_gradient_is_T_times_prob_difference(T):
    s, t, _ = logits()
    s = s.requires_grad_()
    kd_loss(s, t, T=T, alpha=0.0).backward()
    torch.testing.assert_close(s.grad, T * (softmax_t(s.detach(), T) - softmax_t(t, T)) / len(s))


def test_T_squared_keeps_soft_gradient_size():
    "For small centred logits the T^2-scaled gradient tends to (s - t) / (C * n), the same at every large T."
    s, t, _ = logits(scale=0.05)
    s, t = s - s.mean(1, keepdim=True), t - t.mean(1, keepdim=True)
    grads = []
    for T in (4.0, 8.0, 16.0):
        sg = s.clone().requires_grad_()
        grads.append(torch.autograd.grad(kd_loss(sg, t, T=T, alpha=0.0), sg)[0])
    expected = (s - t) / (s.shape[1] * len(s))
    for g in grads: torch.testing.assert_close(g, expected, rtol=0, atol=0.02 * expected.abs().max().item())
    # without the T^2 factor the gradient would shrink 4x from T=4 to T=8
    assert abs(grads[0].norm() / grads[1].norm() - 1) < 0.02


def test_no_gradient_reaches_the_teacher():
    s, t, y = logits()
    t = t.requires_grad_()
    kd_loss(s.requires_grad_(), t, y, T=2, alpha=0.5).backward()
    assert t.grad is None


def test_unlabelled_items_enter_only_the_soft_term():
    s, t, y = logits(n=8)
    y_some = y.clone(); y_some[:6] = -1
    torch.testing.assert_close(kd_loss(s, t, y_some, T=2, alpha=1.0), F.cross_entropy(s[6:], y[6:], reduction="sum") / 8)
    none = torch.full_like(y, -1)
    torch.testing.assert_close(kd_loss(s, t, none, T=2, alpha=0.4), 0.6 * kd_loss(s, t, T=2, alpha=0.0))


@pytest.mark.parametrize("alpha", [-0.1, 1.01, "0.5", None, True])
def test_bad_alpha(alpha):
    s, t, y = logits()
    with pytest.raises(ValueError, match=r"alpha=.* must be a (finite number|number in \[0, 1\]); the weight"): kd_loss(s, t, y, alpha=alpha)
    with pytest.raises(ValueError, match=r"alpha=.* must be a (finite number|number in \[0, 1\]); the weight"): Distill(alpha=alpha)


def test_bad_shapes():
    s, t, y = logits()
    with pytest.raises(ValueError, match="disagree"): kd_loss(s, t[:, :3], y)
    with pytest.raises(ValueError, match="disagree"): kd_loss(s, t[:8], y)
    with pytest.raises(ValueError, match="shape \\(n, classes\\)"): kd_loss(s[0], t[0], y[:1])
    with pytest.raises(ValueError, match="one label per row"): kd_loss(s, t, y[:3])
    with pytest.raises(TypeError, match="float tensor"): kd_loss(s.long(), t, y)
    with pytest.raises(ValueError, match="pass alpha=0"): kd_loss(s, t, None, alpha=0.5)


# ---------------------------------------------------------------- feature_kd_loss
def test_feature_kd_loss_is_mse_after_projection():
    g = torch.Generator().manual_seed(1)
    fs, ft = torch.randn(10, 6, generator=g), torch.randn(10, 4, generator=g)
    proj = nn.Linear(6, 4)
    torch.testing.assert_close(feature_kd_loss(fs, ft, proj), F.mse_loss(proj(fs), ft))
    conv = nn.Conv2d(3, 5, 1)
    maps_s, maps_t = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 5, 4, 4, generator=g)
    torch.testing.assert_close(feature_kd_loss(maps_s, maps_t, conv), F.mse_loss(conv(maps_s), maps_t))
    with pytest.raises(ValueError, match="teacher's width"): feature_kd_loss(fs, ft, nn.Linear(6, 3))
    with pytest.raises(ValueError, match="same size"): feature_kd_loss(maps_s, maps_t[..., :2, :2], conv)
    with pytest.raises(TypeError, match="learned nn.Module"): feature_kd_loss(fs, ft, lambda x: x)


# ---------------------------------------------------------------- cache_teacher and Distill
def toy():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 3))
    data = TensorDataset(torch.randn(12, 1, 2, 2), torch.arange(12) % 3)
    return teacher, data


def test_cache_teacher_equals_eval_mode_outputs_and_restores_mode():
    teacher, data = toy()
    teacher.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # an eval-mode teacher gives no warning
        cached = cache_teacher(teacher, data, batch_size=5)
    assert not teacher.training
    x, y, t = cached.tensors
    assert torch.equal(x, data.tensors[0]) and torch.equal(y, data.tensors[1])
    torch.testing.assert_close(t, teacher(data.tensors[0]).detach())


def test_cache_teacher_warns_on_train_mode_teacher():
    teacher, data = toy()
    with pytest.warns(UserWarning, match="train mode"):
        cached = cache_teacher(teacher, data, teacher_transform=lambda x: x * 2)
    assert teacher.training                     # handed back in the mode it came in
    torch.testing.assert_close(cached.tensors[2], teacher.eval()(data.tensors[0] * 2).detach())


def test_cache_teacher_bad_inputs():
    teacher, data = toy()
    with pytest.raises(TypeError, match="torch.nn.Module"): cache_teacher(lambda x: x, data)
    with pytest.raises(TypeError, match="Dataset"): cache_teacher(teacher, 5)
    with pytest.raises(ValueError, match="is empty"): cache_teacher(teacher, TensorDataset(torch.zeros(0, 1, 2, 2), torch.zeros(0)))
    with pytest.raises(TypeError, match="teacher_transform"): cache_teacher(teacher, data, teacher_transform=3)


def first_losses(data, callback, steps=3):
    torch.manual_seed(1)
    student, log = nn.Sequential(nn.Flatten(), nn.Linear(4, 3)), StepLog(max_steps=steps)
    dl = DataLoader(data, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(0))
    fit(student, dl, epochs=1, callbacks=[callback, log], metrics=None, progress=False, device="cpu")
    return log.losses


def test_distill_cached_equals_live_teacher():
    teacher, data = toy()
    teacher.eval()
    cached = cache_teacher(teacher, data)
    live = first_losses(data, Distill(T=3, alpha=0.2, teacher=teacher))
    # the cache runs the teacher in other batch sizes than the live loop: float32 sums in another order (~1e-7 apart
    # on some CPUs), so compare at float32 precision; a wrong or misaligned cache differs by orders of magnitude more
    torch.testing.assert_close(first_losses(cached, Distill(T=3, alpha=0.2)), live, rtol=1e-5, atol=1e-6)
    assert not teacher.training


def test_distill_live_teacher_in_train_mode_warns_and_runs_in_eval():
    teacher, data = toy()
    with pytest.warns(UserWarning, match="train mode"):
        live = first_losses(data, Distill(T=3, alpha=0.2, teacher=teacher))
    assert teacher.training
    teacher.eval()
    torch.testing.assert_close(first_losses(data, Distill(T=3, alpha=0.2, teacher=teacher)), live)


def test_distill_alpha_one_is_plain_fit():
    teacher, data = toy()
    cached = cache_teacher(teacher.eval(), data)
    torch.testing.assert_close(first_losses(cached, Distill(alpha=1.0)), first_losses(data, StepLog()))


def test_distill_handles_unlabelled_rows_and_valid_loss():
    teacher, data = toy()
    x, y, t = cache_teacher(teacher.eval(), data).tensors
    y_masked = torch.where(torch.arange(len(y)) < 3, y, torch.full_like(y, -1))
    student = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    h = fit(student, DataLoader(TensorDataset(x, y_masked, t), batch_size=4), DataLoader(data, batch_size=6), epochs=2,
            callbacks=Distill(T=2, alpha=0.5), progress=False, device="cpu")
    assert len(h) == 2 and all(torch.isfinite(torch.tensor(h["valid_loss"])))


def test_distill_without_logits_says_what_to_do():
    _, data = toy()
    with pytest.raises(ValueError, match="cache_teacher"):
        fit(nn.Sequential(nn.Flatten(), nn.Linear(4, 3)), DataLoader(data, batch_size=4), callbacks=Distill(),
            metrics=None, progress=False, device="cpu")
    with pytest.raises(TypeError, match="torch.nn.Module"): Distill(teacher="mobilenet_v2")
