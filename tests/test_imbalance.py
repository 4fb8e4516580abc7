"""tltutor.imbalance: bad inputs, cross-checks against scikit-learn (and imbalanced-learn when installed), and the
numerical identities (focal with gamma=0 is CE, logit adjustment with tau=0 or uniform priors is a no-op, ...).

Tiny tensors only: runs in a few seconds, no data or weights needed."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, recall_score
from sklearn.utils.class_weight import compute_class_weight
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tltutor.core import Callback, fit
from tltutor.imbalance import (DeferredReweighting, FocalLoss, adjust_logits, balanced_sampler, class_balanced_loss,
                               class_counts, class_priors, class_weights, classifier_retraining, imbalance_report,
                               logit_adjusted_loss, plot_imbalance, smote)


def long_tailed_labels(sizes=(200, 60, 20, 7, 2), seed=0):
    y = torch.cat([torch.full((n,), c) for c, n in enumerate(sizes)])
    return y[torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))]


def logits_and_targets(n=64, c=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, generator=g) * 3, torch.randint(c, (n,), generator=g)


# ---------------------------------------------------------------- labels, counts, priors
@pytest.mark.parametrize("bad, match", [
    ([0, 0, 2], r"class\(es\) \[1\] have no items"),
    ([0, -1, 1], "must be >= 0"),
    (torch.tensor([0.0, 1.0]), "integer class indices"),
    ([], "non-empty 1-D"),
    (torch.zeros(2, 2, dtype=torch.long), "non-empty 1-D"),
])
def test_bad_labels(bad, match):
    with pytest.raises((ValueError, TypeError), match=match): class_counts(bad)


def test_missing_class_with_num_classes_and_out_of_range():
    with pytest.raises(ValueError, match=r"\[3\] have no items"): class_priors([0, 1, 2], num_classes=4)
    with pytest.raises(ValueError, match="out of range for num_classes=2"): class_counts([0, 1, 2], num_classes=2)
    with pytest.raises(TypeError, match="tensor, array or list"): class_counts("012")


def test_counts_and_priors():
    y = long_tailed_labels()
    assert class_counts(y).tolist() == [200, 60, 20, 7, 2]
    p = class_priors(y.numpy())
    assert abs(float(p.sum()) - 1) < 1e-6 and torch.allclose(p, torch.tensor([200, 60, 20, 7, 2]) / 289.0)


# ---------------------------------------------------------------- class weights
def test_inverse_weights_equal_sklearn_balanced():
    y = long_tailed_labels()
    ref = compute_class_weight("balanced", classes=np.arange(5), y=y.numpy())
    np.testing.assert_allclose(class_weights(y).numpy(), ref, rtol=1e-6)
    np.testing.assert_allclose(class_weights(y.tolist(), "inverse").numpy(), ref, rtol=1e-6)


def test_effective_number_limits_and_normalisation():
    y = long_tailed_labels()
    counts = class_counts(y).double()
    np.testing.assert_allclose(class_weights(y, "effective_number", beta=0.0).numpy(), np.ones(5), rtol=1e-6)
    # beta -> 1: the effective number tends to n_c, so the weights tend to the inverse scheme
    np.testing.assert_allclose(class_weights(y, "effective_number", beta=1 - 1e-9).numpy(), class_weights(y).numpy(), rtol=1e-4)
    w = class_weights(y, "effective_number", beta=0.99).double()
    assert abs(float((w * counts).sum() / counts.sum()) - 1) < 1e-6     # average item weight is 1
    assert torch.all(w[1:] > w[:-1])                                    # rarer class, larger weight
    assert torch.all(w <= class_weights(y).double().max() + 1e-6)


@pytest.mark.parametrize("scheme", ["inverse", "effective_number"])
def test_balanced_set_gets_equal_weights(scheme):
    w = class_weights(torch.arange(6).repeat(7), scheme)
    np.testing.assert_allclose(w.numpy(), np.ones(6), rtol=1e-6)


def test_class_weights_bad_inputs():
    y = long_tailed_labels()
    with pytest.raises(ValueError, match="use 'inverse' or 'effective_number'"): class_weights(y, "log")
    for beta in (1.0, -0.1):
        with pytest.raises(ValueError, match=r"in \[0, 1\)"): class_weights(y, "effective_number", beta=beta)
    with pytest.raises(ValueError, match="beta=True must be a finite number"): class_weights(y, "effective_number", beta=True)
    with pytest.raises(ValueError, match="have no items"): class_weights([0, 0, 2])


# ---------------------------------------------------------------- sampler
def test_balanced_sampler_draws_classes_equally_and_is_seeded():
    y = long_tailed_labels()
    drawn = y[list(balanced_sampler(y, num_samples=10_000, seed=1))]
    freq = class_counts(drawn).double() / 10_000
    assert torch.all((freq - 0.2).abs() < 0.02), freq
    assert list(balanced_sampler(y, seed=3)) == list(balanced_sampler(y, seed=3))
    assert len(balanced_sampler(y)) == len(y)


def test_balanced_sampler_bad_inputs():
    with pytest.raises(ValueError, match="must be a positive integer"): balanced_sampler([0, 1], num_samples=0)
    with pytest.raises(ValueError, match="have no items"): balanced_sampler([0, 2])


# ---------------------------------------------------------------- focal and class-balanced losses
def test_focal_gamma0_equals_cross_entropy():
    z, t = logits_and_targets()
    torch.testing.assert_close(FocalLoss(gamma=0)(z, t), F.cross_entropy(z, t))
    torch.testing.assert_close(FocalLoss(gamma=0.0, alpha=None)(z, t), nn.CrossEntropyLoss()(z, t))


def test_focal_matches_formula_and_is_below_ce():
    z, t = logits_and_targets()
    p = F.softmax(z, 1).gather(1, t[:, None]).squeeze(1)
    alpha = torch.tensor([0.5, 1.0, 2.0, 1.5, 0.25])
    ref = (-alpha[t] * (1 - p) ** 2 * p.log()).mean()
    torch.testing.assert_close(FocalLoss(2.0, alpha)(z, t), ref)
    assert FocalLoss(2.0)(z, t) < F.cross_entropy(z, t)


def test_focal_gradient_flows_and_bad_inputs():
    z, t = logits_and_targets()
    z.requires_grad_(True)
    FocalLoss(2.0)(z, t).backward()
    assert z.grad is not None and torch.isfinite(z.grad).all()
    with pytest.raises(ValueError, match="must be a number >= 0"): FocalLoss(gamma=-0.5)
    with pytest.raises(ValueError, match="positive per-class weights"): FocalLoss(alpha=[1.0, -1.0])
    with pytest.raises(ValueError, match="alpha has 2 weights"): FocalLoss(alpha=[1.0, 1.0])(*logits_and_targets())


def test_class_balanced_loss_is_effective_number_weighted_ce():
    z, t = logits_and_targets()
    w = class_weights(t, "effective_number", beta=0.9)
    ref = (F.cross_entropy(z, t, reduction="none") * w[t]).mean()
    torch.testing.assert_close(class_balanced_loss(t, beta=0.9)(z, t), ref)
    assert class_balanced_loss(t, gamma=1.0).gamma == 1.0
    with pytest.raises(ValueError, match=r"in \[0, 1\)"): class_balanced_loss(t, beta=1.5)


# ---------------------------------------------------------------- logit adjustment
def test_logit_adjustment_identities():
    z, t = logits_and_targets()
    uniform = torch.full((5,), 0.2)
    priors = class_priors(long_tailed_labels())
    torch.testing.assert_close(adjust_logits(z, priors, tau=0.0), z)                     # tau = 0: no-op
    assert torch.equal(adjust_logits(z, uniform).argmax(1), z.argmax(1))                 # uniform priors: same decisions
    torch.testing.assert_close(logit_adjusted_loss(uniform)(z, t), F.cross_entropy(z, t))
    torch.testing.assert_close(logit_adjusted_loss(priors, tau=0)(z, t), F.cross_entropy(z, t))
    # post-hoc adjustment = Bayes' rule: argmax p(y|x) / p(y)
    assert torch.equal(adjust_logits(z, priors).argmax(1), (F.softmax(z, 1) / priors).argmax(1))


def test_logit_adjusted_loss_matches_formula():
    z, t = logits_and_targets()
    priors = class_priors(long_tailed_labels())
    torch.testing.assert_close(logit_adjusted_loss(priors, tau=0.5)(z, t), F.cross_entropy(z + 0.5 * priors.log(), t))


@pytest.mark.parametrize("priors, tau, match", [
    ([0.5, 0.4], 1.0, "not 1: pass frequencies"),
    ([1.0, 0.0], 1.0, "must all be > 0"),
    ([1.2, -0.2], 1.0, "must all be > 0"),
    ([0.5, 0.5], -0.1, "must be a number >= 0"),
    ([1.0], 1.0, "1-D sequence of class frequencies"),
])
def test_priors_and_tau_bad_inputs(priors, tau, match):
    with pytest.raises(ValueError, match=match): logit_adjusted_loss(priors, tau)
    with pytest.raises(ValueError, match=match): adjust_logits(torch.zeros(3, len(priors)), priors, tau)


def test_adjust_logits_shape_mismatch():
    with pytest.raises(ValueError, match="do not match 3 priors"): adjust_logits(torch.zeros(4, 2), [0.2, 0.3, 0.5])


# ---------------------------------------------------------------- deferred re-weighting
class SeeWeight(Callback):
    order = 1
    def before_fit(self, s): self.seen = []
    def before_batch(self, s): self.seen.append(getattr(s.loss_fn, self.attr))
    def __init__(self, attr): self.attr = attr


def tiny_dl():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(12, 4, generator=g), torch.tensor([0] * 9 + [1] * 3)
    return DataLoader(TensorDataset(x, y), batch_size=6), y


@pytest.mark.parametrize("loss, attr", [(nn.CrossEntropyLoss, "weight"), (lambda: FocalLoss(2.0), "alpha")])
def test_drw_switches_at_start_epoch_and_restores(loss, attr):
    dl, y = tiny_dl()
    loss_fn, see, w = loss(), SeeWeight(attr), class_weights(y)
    h = fit(nn.Linear(4, 2), dl, epochs=3, loss_fn=loss_fn, callbacks=[DeferredReweighting(w, 2), see], progress=False)
    assert h["reweighted"] == [0, 1, 1]
    assert see.seen[0] is None and see.seen[1] is None
    assert all(torch.equal(s, w) for s in see.seen[2:])
    assert getattr(loss_fn, attr) is None


def test_drw_reweighted_loss_equals_weighted_ce():
    dl, y = tiny_dl()
    w = class_weights(y)
    class Grab(Callback):
        order = 1
        def after_loss(self, s): self.loss, self.out, self.yb = s.loss.detach(), s.out.detach(), s.yb
    g = Grab()
    fit(nn.Linear(4, 2), dl, epochs=1, loss_fn=nn.CrossEntropyLoss(), callbacks=[DeferredReweighting(w, 1), g], progress=False)
    torch.testing.assert_close(g.loss, F.cross_entropy(g.out, g.yb, weight=w))


def test_drw_bad_inputs():
    dl, _ = tiny_dl()
    with pytest.raises(TypeError, match="needs a loss with a `weight` or `alpha`"):
        fit(nn.Linear(4, 2), dl, epochs=2, loss_fn=F.cross_entropy, callbacks=[DeferredReweighting([1.0, 2.0], 1)], progress=False)
    with pytest.raises(ValueError, match="after the last epoch"):
        fit(nn.Linear(4, 2), dl, epochs=2, loss_fn=nn.CrossEntropyLoss(), callbacks=[DeferredReweighting([1.0, 2.0], 3)], progress=False)
    with pytest.raises(ValueError, match="positive integer"): DeferredReweighting([1.0, 2.0], 0)
    with pytest.raises(ValueError, match="positive per-class weights"): DeferredReweighting([1.0, 0.0], 1)


# ---------------------------------------------------------------- cRT
def test_crt_retrains_only_the_last_linear_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    model[0].weight.requires_grad_(False)              # a flag the caller set must survive
    x, y = torch.randn(30, 4), long_tailed_labels((20, 7, 3))
    body = {k: v.clone() for k, v in model[0].state_dict().items()}
    head = model[2].weight.detach().clone()
    h = classifier_retraining(model, x, y, epochs=3, batch_size=8)
    assert len(h) == 3
    assert all(torch.equal(model[0].state_dict()[k], v) for k, v in body.items())
    assert not torch.equal(model[2].weight, head)
    assert not model[0].weight.requires_grad and model[0].bias.requires_grad and model[2].weight.requires_grad


def test_crt_bad_inputs():
    with pytest.raises(TypeError, match="has no nn.Linear layer"):
        classifier_retraining(nn.Sequential(nn.ReLU()), torch.randn(4, 2), [0, 1, 0, 1])
    with pytest.raises(ValueError, match="one row per label"):
        classifier_retraining(nn.Linear(2, 2), torch.randn(3, 2), [0, 1, 0, 1])


# ---------------------------------------------------------------- SMOTE
def _on_a_segment(p, pts, k):
    "Is `p` on a segment between a point of `pts` and one of its k nearest neighbours in `pts`?"
    d = torch.cdist(pts, pts); d.fill_diagonal_(float("inf"))
    nbrs = d.topk(min(k, len(pts) - 1), largest=False).indices
    for i in range(len(pts)):
        for j in nbrs[i]:
            a, b = pts[i], pts[j]
            lam = torch.dot(p - a, b - a) / torch.dot(b - a, b - a)
            if -1e-5 <= lam <= 1 + 1e-5 and torch.allclose(a + lam * (b - a), p, atol=1e-4): return True
    return False


def test_smote_balances_keeps_originals_and_interpolates_neighbours():
    g = torch.Generator().manual_seed(0)
    y = long_tailed_labels((40, 9, 4, 1))
    x = torch.randn(len(y), 3, generator=g) + y[:, None] * 5.0
    xn, yn = smote(x, y, k=3, seed=0)
    assert class_counts(yn).tolist() == [40, 40, 40, 40]
    assert torch.equal(xn[:len(y)], x) and torch.equal(yn[:len(y)], y)
    for c in (1, 2):
        pts = x[y == c]
        assert all(_on_a_segment(p, pts, 3) for p in xn[len(y):][yn[len(y):] == c])
    lone = x[y == 3][0]
    assert torch.equal(xn[len(y):][yn[len(y):] == 3], lone.expand(39, -1))       # one item: copies
    x2, y2 = smote(x, y, k=3, seed=0)
    assert torch.equal(x2, xn) and torch.equal(y2, yn)


def test_smote_matches_imbalanced_learn_counts():
    imblearn = pytest.importorskip("imblearn.over_sampling")
    g = torch.Generator().manual_seed(1)
    y = long_tailed_labels((50, 20, 8))
    x = torch.randn(len(y), 4, generator=g) + y[:, None] * 4.0
    xr, yr = imblearn.SMOTE(k_neighbors=5, random_state=0).fit_resample(x.numpy(), y.numpy())
    xn, yn = smote(x, y, k=5)
    assert np.bincount(yr).tolist() == class_counts(yn).tolist()
    np.testing.assert_allclose(xr[:len(y)], x.numpy())      # both keep the originals first
    for c in (1, 2):   # the library's synthetic points pass the same geometric check as ours
        pts = x[y == c]
        assert all(_on_a_segment(torch.as_tensor(p), pts, 5) for p in xr[len(y):][yr[len(y):] == c])


def test_smote_bad_inputs():
    with pytest.raises(ValueError, match="must be a positive integer"): smote(torch.randn(4, 2), [0, 0, 1, 1], k=0)
    with pytest.raises(ValueError, match="one row per label"): smote(torch.randn(3, 2), [0, 0, 1, 1])
    with pytest.raises(ValueError, match="have no items"): smote(torch.randn(3, 2), [0, 0, 2])


# ---------------------------------------------------------------- report
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_report_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    y_true = rng.choice(6, size=300, p=[0.5, 0.2, 0.15, 0.1, 0.04, 0.01])
    y_pred = np.where(rng.random(300) < 0.6, y_true, rng.integers(0, 6, 300))
    rep = imbalance_report(y_true, y_pred, train_counts=[500, 200, 150, 100, 40, 10], n_tail=2)
    assert rep["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    assert rep["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y_true, y_pred))
    assert rep["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro", zero_division=0))
    recall = recall_score(y_true, y_pred, average=None, labels=np.arange(6), zero_division=0)
    np.testing.assert_allclose(rep["recall"], recall)
    assert rep["tail_recall"] == pytest.approx(recall[[4, 5]].mean())
    assert rep["confusion"].sum() == 300


def test_report_with_a_class_never_predicted_or_absent():
    y_true, y_pred = np.array([0, 0, 1, 1, 2]), np.array([0, 0, 0, 1, 3])     # class 3 only predicted, 2 never predicted
    rep = imbalance_report(y_true, y_pred, num_classes=4)
    with pytest.warns(UserWarning): ref = balanced_accuracy_score(y_true, y_pred)
    assert rep["balanced_accuracy"] == pytest.approx(ref)
    assert rep["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro", zero_division=0))


def test_report_bad_inputs():
    with pytest.raises(ValueError, match="y_pred has 2"): imbalance_report([0, 1, 1], [0, 1])
    with pytest.raises(ValueError, match=r"one count per class \(2\)"):
        imbalance_report([0, 1], [0, 1], train_counts=[5, 4, 3], num_classes=2)
    with pytest.raises(ValueError, match="out of range for num_classes=2"): imbalance_report([0, 2], [0, 1], train_counts=[5, 4])
    with pytest.raises(ValueError, match="n_tail=0"): imbalance_report([0, 1], [0, 1], train_counts=[5, 4], n_tail=0)


def test_plot_imbalance_runs_and_checks_lengths():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rep = imbalance_report([0, 1, 2, 2], [0, 2, 2, 2], train_counts=[10, 5, 1])
    fig = plot_imbalance(rep, [10, 5, 1], ["a", "b", "c"], title="toy")
    assert len(fig.axes) == 3
    plt.close(fig)
    with pytest.raises(ValueError, match="train_counts has 2 classes"): plot_imbalance(rep, [10, 5])
