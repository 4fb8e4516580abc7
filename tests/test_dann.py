"""tltutor.dann: gradient reversal identities, MMD and A-distance cross-checks, bad inputs, the fit callback."""
import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tltutor.core import fit, seed_everything
from tltutor.dann import (DANN, DomainAdversary, DomainDiscriminator, GradientReversal, a_distance, dann_lambda,
                          digit_features, grad_reverse, mmd, mmd_test, pseudo_label, source_loss, tsne_domains)


# --- gradient reversal ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("lam", [0.0, 0.3, 1.0, 2.5])
def test_grl_identity_forward_negated_gradient_backward(lam):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 5, generator=g, requires_grad=True)
    w = torch.randn(4, 5, generator=g)
    y = GradientReversal(lam)(x)
    assert torch.equal(y, x)                                     # identity forward, same values
    (gx,) = torch.autograd.grad((y * w).sin().sum(), x)
    x2 = x.detach().clone().requires_grad_(True)
    (gref,) = torch.autograd.grad((x2 * w).sin().sum(), x2)       # the same loss without the layer
    torch.testing.assert_close(gx, -lam * gref)
    (gf,) = torch.autograd.grad((grad_reverse(x, lam) * w).sin().sum(), x)
    torch.testing.assert_close(gf, -lam * gref)


def test_grl_flips_only_the_layers_below_it():
    "In a DANN, the domain loss's gradient on the feature extractor is exactly the negated one without reversal; the domain head's is unchanged."
    seed_everything(0)
    model = DANN(); model.eval()
    plain = copy.deepcopy(model); plain.grl = nn.Identity()
    x = torch.randn(8, 3, 28, 28); d = torch.tensor([0, 1] * 4)
    model.grl.lambda_ = 1.0
    grads = []
    for m in (model, plain):
        m.zero_grad(); F.cross_entropy(m(x)[1], d).backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    rev, ref = grads
    assert set(rev) == set(ref)
    for n in ref:
        if n.startswith("features."): torch.testing.assert_close(rev[n], -ref[n])
        elif n.startswith("domain."): torch.testing.assert_close(rev[n], ref[n])
    assert not any(n.startswith("classifier.") for n in ref)      # the label head is not on the domain path


def test_grl_works_on_any_shape_and_dtype():
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    GradientReversal(2.0)(x).sum().backward()
    assert torch.equal(x.grad, torch.full_like(x, -2.0))


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf"), "1", None, True])
def test_grl_bad_lambda(bad):
    with pytest.raises(ValueError, match="must be a finite number >= 0"):
        GradientReversal(bad)
    layer = GradientReversal()
    with pytest.raises(ValueError, match="must be a finite number >= 0"):
        layer.lambda_ = bad
    with pytest.raises(ValueError, match="must be a finite number >= 0"):
        grad_reverse(torch.ones(2), bad)


def test_grad_reverse_needs_tensor():
    with pytest.raises(TypeError, match="needs a tensor"):
        grad_reverse(np.ones(3))


def test_dann_lambda_schedule():
    assert dann_lambda(0) == 0.0
    assert dann_lambda(1) == pytest.approx(2 / (1 + math.exp(-10)) - 1)
    assert dann_lambda(0.5, gamma=1) == pytest.approx(2 / (1 + math.exp(-0.5)) - 1)
    vals = [dann_lambda(p) for p in np.linspace(0, 1, 11)]
    assert all(a < b for a, b in zip(vals, vals[1:])) and max(vals) < 1
    for bad in (-0.01, 1.01, "0.5", True):
        with pytest.raises(ValueError, match="must be in \\[0, 1\\]"): dann_lambda(bad)
    with pytest.raises(ValueError, match="positive number"): dann_lambda(0.5, gamma=-1)


# --- model pieces --------------------------------------------------------------------------------------------------

def test_dann_shapes_and_discriminator():
    m = DANN(n_classes=7, n_domains=3)
    c, d = m(torch.randn(5, 3, 28, 28))
    assert c.shape == (5, 7) and d.shape == (5, 3)
    assert m.embed(torch.randn(2, 3, 28, 28)).shape == (2, 768)
    grey = DANN(features=digit_features(1), feature_dim=768)
    assert grey(torch.randn(2, 1, 28, 28))[0].shape == (2, 10)
    assert DomainDiscriminator(16, hidden=[8, 4])(torch.randn(3, 16)).shape == (3, 2)
    y = torch.tensor([0, 1, 2, 3, 4])
    assert source_loss((c, d), y).item() == pytest.approx(F.cross_entropy(c, y).item())
    assert source_loss(c, y).item() == pytest.approx(F.cross_entropy(c, y).item())


@pytest.mark.parametrize("kw,msg", [(dict(in_features=0), "positive integer"), (dict(in_features=4, hidden=0), "positive integer"),
                                    (dict(in_features=4, n_domains=1), "needs two groups"),
                                    (dict(in_features=4, dropout=1.0), "in \\[0, 1\\)")])
def test_discriminator_bad_inputs(kw, msg):
    with pytest.raises(ValueError, match=msg): DomainDiscriminator(**kw)


def test_dann_bad_inputs():
    with pytest.raises(ValueError, match="integer >= 2"): DANN(n_classes=1)
    with pytest.raises(ValueError, match="1 \\(grey\\) or 3"): digit_features(4)


# --- the fit callback ----------------------------------------------------------------------------------------------

def _toy(seed=0, n=48):
    g = torch.Generator().manual_seed(seed)
    src = TensorDataset(torch.randn(n, 3, 28, 28, generator=g), torch.randint(10, (n,), generator=g))
    return src, torch.randn(40, 3, 28, 28, generator=g) + 2.0


def test_domain_adversary_runs_through_core_fit():
    seed_everything(0)
    src, tgt = _toy()
    cb = DomainAdversary(tgt, seed=1)
    h = fit(DANN(), DataLoader(src, batch_size=16), epochs=3, loss_fn=source_loss, callbacks=[cb], device="cpu", progress=False)
    assert len(h) == 3 and {"domain_acc", "lambda"} <= set(h.columns)
    steps = 9
    assert cb.lambdas == pytest.approx([dann_lambda(i / steps) for i in range(steps)])
    assert h["lambda"][-1] == pytest.approx(dann_lambda(8 / 9))
    assert all(0 <= a <= 1 for a in h["domain_acc"])
    assert len(cb.batch_acc) == steps and np.mean(cb.batch_acc[6:]) == pytest.approx(h["domain_acc"][-1])


def test_domain_adversary_adds_the_domain_loss():
    "With lr=0 nothing moves: the logged train loss is source CE + weight * domain CE on the batches the callback drew."
    seed_everything(0)
    src, tgt = _toy()
    model = DANN(); model.eval()   # no dropout, so the callback's forward is reproducible by hand
    losses = []
    for weight in (0.0, 2.0):
        class Eval(DomainAdversary):
            def before_batch(self, state): state.model.eval(); super().before_batch(state)
        h = fit(model, DataLoader(src, batch_size=48), epochs=1, lr=0.0, loss_fn=source_loss,
                callbacks=[Eval(tgt, weight=weight, seed=3)], device="cpu", progress=False)
        losses.append(h.last["train_loss"])
    with torch.no_grad():
        xs, ys = src.tensors
        idx = torch.randint(len(tgt), (48,), generator=torch.Generator().manual_seed(3))
        c, ds = model(xs); _, dt = model(tgt[idx])
        ce = F.cross_entropy(c, ys).item()
        dom = F.cross_entropy(torch.cat([ds, dt]), torch.cat([torch.zeros(48), torch.ones(48)]).long()).item()
    assert losses[0] == pytest.approx(ce, rel=1e-5)
    assert losses[1] == pytest.approx(ce + 2.0 * dom, rel=1e-5)


def test_domain_adversary_bad_inputs():
    src, tgt = _toy()
    with pytest.raises(ValueError, match="target is empty"): DomainAdversary(torch.empty(0, 3, 28, 28))
    with pytest.raises(TypeError, match="target must be a tensor"): DomainAdversary([1, 2, 3])
    with pytest.raises(ValueError, match="looks like labels"): DomainAdversary(torch.randint(10, (40,)))
    with pytest.raises(ValueError, match="looks like labels"): DomainAdversary(torch.randint(10, (40, 3, 28, 28)))
    with pytest.raises(TypeError, match="pass the images alone"): DomainAdversary((tgt, torch.randint(10, (40,))))
    with pytest.raises(ValueError, match="weight=True must be a finite number"): DomainAdversary(tgt, weight=True)
    with pytest.raises(ValueError, match=">= 0"): DomainAdversary(tgt, weight=-1)
    with pytest.raises(ValueError, match="finite number >= 0"): DomainAdversary(tgt, max_lambda=-1)
    with pytest.raises(ValueError, match="positive number"): DomainAdversary(tgt, gamma=0)
    dl = DataLoader(TensorDataset(torch.randn(8, 4), torch.zeros(8, dtype=torch.long)), batch_size=4)
    with pytest.raises(TypeError, match="needs a model with a `.grl`"):
        fit(nn.Linear(4, 2), dl, callbacks=[DomainAdversary(tgt)], device="cpu", progress=False)
    assert len(DomainAdversary(TensorDataset(tgt)).target) == 40
    with pytest.raises(ValueError, match="same channels and size"):
        fit(DANN(), DataLoader(src, batch_size=16), loss_fn=source_loss, callbacks=[DomainAdversary(tgt[:, :1])],
            device="cpu", progress=False)


# --- MMD -----------------------------------------------------------------------------------------------------------

def test_mmd_same_distribution_near_zero_and_grows_with_shift():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(200, 4, generator=g), torch.randn(200, 4, generator=g)
    vals = [mmd(a, b + s) for s in (0.0, 0.25, 0.5, 1.0, 2.0)]
    assert abs(vals[0]) < 0.01
    assert all(x < y for x, y in zip(vals, vals[1:]))
    lin = [mmd(a, b + s, kernel="linear") for s in (0.0, 1.0)]
    assert abs(lin[0]) < 0.1 and lin[1] == pytest.approx(4.0, abs=0.5)   # |shift|^2 * d = 4
    assert mmd(a, a) == pytest.approx(mmd(a, a.clone()))
    assert abs(mmd(a, a)) < 0.02


def _unbiased(kss, ktt, kst):
    n, m = len(kss), len(ktt)
    return ((kss.sum() - np.trace(kss)) / (n * (n - 1)) + (ktt.sum() - np.trace(ktt)) / (m * (m - 1)) - 2 * kst.mean())


def test_mmd_matches_sklearn_kernels():
    from sklearn.metrics.pairwise import euclidean_distances, linear_kernel, rbf_kernel
    rng = np.random.default_rng(1)
    s, t = rng.normal(size=(30, 6)), rng.normal(0.3, 1.2, size=(25, 6))
    ref_lin = _unbiased(linear_kernel(s), linear_kernel(t), linear_kernel(s, t))
    assert mmd(s, t, kernel="linear") == pytest.approx(ref_lin, rel=1e-9)
    z = np.vstack([s, t]); d2 = euclidean_distances(z, squared=True)
    med = np.median(d2[~np.eye(len(z), dtype=bool)])
    for bws in ([1.0], [0.5, 2.0]):
        k = lambda a, b=None: sum(rbf_kernel(a, b, gamma=1 / (2 * bw * med)) for bw in bws) / len(bws)
        assert mmd(s, t, bandwidths=bws) == pytest.approx(_unbiased(k(s), k(t), k(s, t)), rel=1e-6)
    assert mmd(torch.from_numpy(s).float(), torch.from_numpy(t).float(), kernel="linear") == pytest.approx(ref_lin, rel=1e-4)


@pytest.mark.parametrize("s,t,kw,err,msg", [
    (np.ones((5, 3)), np.ones((5, 4)), {}, ValueError, "same feature extractor"),
    (np.ones((5, 3)), np.ones((0, 3)), {}, ValueError, "is the target empty"),
    (np.ones((5, 3)), np.ones((1, 3)), {}, ValueError, "at least 2"),
    (np.ones((5, 3)), np.ones((5, 3)), dict(kernel="poly"), ValueError, "'rbf' or 'linear'"),
    (np.ones((5, 3)), np.ones((5, 3)), dict(bandwidths=[0.0]), ValueError, "must be positive"),
    (np.ones((5, 3)), np.ones((5, 3)), dict(bandwidths=[]), ValueError, "must be positive"),
    (np.ones((5, 3, 2)), np.ones((5, 3, 2)), {}, ValueError, "flatten the features"),
    ([[1.0, 2.0]], np.ones((5, 2)), {}, TypeError, "tensor or numpy array"),
])
def test_mmd_bad_inputs(s, t, kw, err, msg):
    with pytest.raises(err, match=msg): mmd(s, t, **kw)


def test_mmd_test_statistic_and_permutation_p_value():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(120, 5, generator=g), torch.randn(120, 5, generator=g)
    stat, p = mmd_test(a, b + 0.6, n_permutations=199, seed=1)
    z = torch.cat([a, b + 0.6]).double(); z = (z - z.mean(0)) / z.std(0)
    assert stat == pytest.approx(mmd(z[:120], z[120:], bandwidths=(1.0,)), rel=1e-9)   # standardised, median heuristic
    assert p == pytest.approx(1 / 200)                                               # no shuffle beats a real shift
    stat0, p0 = mmd_test(a, b, n_permutations=199, seed=1)
    assert abs(stat0) < 0.02 and p0 > 0.05
    assert mmd_test(a * 1000, (b + 0.6) * 1000, n_permutations=50)[0] == pytest.approx(mmd_test(a, b + 0.6, n_permutations=50)[0], rel=1e-6)
    # the p-value against a brute-force permutation loop
    s_, t_ = a[:20], b[:25] + 0.3
    stat, p = mmd_test(s_, t_, n_permutations=60, seed=4)
    z = torch.cat([s_, t_]).double(); z = (z - z.mean(0)) / z.std(0)
    gen = torch.Generator().manual_seed(4)
    perm_stats = [mmd(z[pp[:20]], z[pp[20:]], bandwidths=(1.0,)) for pp in (torch.randperm(45, generator=gen) for _ in range(60))]
    assert p == pytest.approx((1 + sum(x >= stat - 1e-12 for x in perm_stats)) / 61)


@pytest.mark.parametrize("s,t,kw,err,msg", [
    (np.ones((5, 3)), np.ones((5, 4)), {}, ValueError, "same feature extractor"),
    (np.ones((5, 3)), np.ones((0, 3)), {}, ValueError, "is the target empty"),
    (np.ones((5, 3)), np.ones((5, 3)), dict(n_permutations=0), ValueError, "positive integer"),
    (np.ones((5, 3)), np.ones((5, 3)), dict(n_permutations=2.5), ValueError, "positive integer"),
])
def test_mmd_test_bad_inputs(s, t, kw, err, msg):
    with pytest.raises(err, match=msg): mmd_test(s, t, **kw)


# --- A-distance ----------------------------------------------------------------------------------------------------

def test_a_distance_extremes_and_middle():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(400, 5)), rng.normal(size=(400, 5))
    assert a_distance(a, b) < 0.25
    assert a_distance(a, b + 20) == 2.0
    mid = a_distance(a, b + np.array([1.0, 0, 0, 0, 0]))        # overlapping: between the two
    assert 0.5 < mid < 1.9
    assert a_distance(a, b[:100]) == a_distance(a, b[:100])     # deterministic for a seed (balanced subsample)


def test_a_distance_matches_a_sklearn_recipe():
    "Ganin et al.'s proxy: balanced sample, half to train a linear probe per C, lowest held-out error -> 2(1 - 2 err)."
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler
    rng = np.random.default_rng(3)
    s, t = rng.normal(size=(200, 4)), rng.normal(0.4, 1.0, size=(200, 4))
    d, r = np.repeat([0, 1], 200), np.random.default_rng(7)
    X = np.vstack([s[r.permutation(200)], t[r.permutation(200)]])
    Xtr, Xte, dtr, dte = train_test_split(X, d, test_size=0.5, stratify=d, random_state=7)
    sc = StandardScaler().fit(Xtr)
    errs = {C: 1 - LogisticRegression(C=C, max_iter=2000).fit(sc.transform(Xtr), dtr).score(sc.transform(Xte), dte)
            for C in (0.01, 0.1, 1.0)}
    assert a_distance(s, t, seed=7) == pytest.approx(max(0.0, 2 * (1 - 2 * min(errs.values()))))
    assert a_distance(s, t, seed=7, Cs=[1.0]) == pytest.approx(max(0.0, 2 * (1 - 2 * errs[1.0])))
    assert a_distance(s, t, seed=7) >= a_distance(s, t, seed=7, Cs=0.01)   # the sweep keeps the best probe


def test_a_distance_bad_inputs():
    a = np.ones((10, 3))
    with pytest.raises(ValueError, match="same feature extractor"): a_distance(a, np.ones((10, 2)))
    with pytest.raises(ValueError, match="is the target empty"): a_distance(a, np.ones((0, 3)))
    with pytest.raises(ValueError, match="at least 4"): a_distance(a, np.ones((3, 3)))
    with pytest.raises(ValueError, match="in \\(0, 1\\)"): a_distance(a, a, test_size=0)
    for bad in ([], [0.0], [-1.0], [True]):
        with pytest.raises(ValueError, match="must be positive numbers"): a_distance(a, a, Cs=bad)


# --- pseudo-labels and t-SNE ---------------------------------------------------------------------------------------

def test_pseudo_label_keeps_confident_items():
    lin = nn.Linear(2, 2, bias=False)
    with torch.no_grad(): lin.weight.copy_(5 * torch.eye(2))
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [1.0, 0.2]])
    y = torch.tensor([0, 0, 1, 0])
    lin.train()
    pl = pseudo_label(lin, DataLoader(TensorDataset(x, y), batch_size=3), threshold=0.9, device="cpu")
    assert lin.training                                          # mode restored
    assert torch.equal(pl.tensors[0], x[[0, 1, 3]]) and pl.tensors[1].tolist() == [0, 1, 0]
    assert pl.n_seen == 4 and pl.kept_fraction == 0.75 and pl.accuracy() == pytest.approx(2 / 3)
    assert (pl.confidence >= 0.9).all()
    assert len(pseudo_label(DANN(), DataLoader(TensorDataset(torch.randn(4, 3, 28, 28), torch.zeros(4).long())),
                            threshold=0.01, device="cpu")) == 4   # tuple outputs: the class logits are used


@pytest.mark.parametrize("bad", [0, 1, 1.5, -0.2, True, "0.9"])
def test_pseudo_label_bad_threshold(bad):
    dl = DataLoader(TensorDataset(torch.randn(4, 2), torch.zeros(4).long()))
    with pytest.raises(ValueError, match="must be in \\(0, 1\\)"):
        pseudo_label(nn.Linear(2, 2), dl, threshold=bad, device="cpu")


def test_pseudo_label_empty_target():
    empty = DataLoader(TensorDataset(torch.randn(0, 2), torch.zeros(0).long()))
    with pytest.raises(ValueError, match="empty"):
        pseudo_label(nn.Linear(2, 2), empty, threshold=0.5, device="cpu")


def test_tsne_domains_draws_and_validates():
    import matplotlib
    matplotlib.use("Agg")
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(40, 5)), rng.normal(3, 1, size=(30, 5))
    ax = tsne_domains(s, t, n=20)
    assert ax.get_title() == "t-SNE of the features" and len(ax.collections) == 2
    ax = tsne_domains(s, t, labels=(np.arange(40) % 10, np.arange(30) % 10), n=20, title="x")
    assert ax.get_title() == "x"
    with pytest.raises(ValueError, match="one label per row"): tsne_domains(s, t, labels=(np.zeros(3), np.zeros(3)))
    with pytest.raises(ValueError, match="same feature extractor"): tsne_domains(s, t[:, :2])


def test_one_gradient_reversal_in_the_package():
    "The bias audit reuses the DANN chapter's layer, warm-up and discriminator instead of keeping copies."
    import tltutor.audit as audit
    import tltutor.dann as dann
    assert audit.GradientReversal is dann.GradientReversal and audit.grad_reverse is dann.grad_reverse
    assert audit.dann_lambda is dann.dann_lambda
    adv = audit.AdversarialDebiasing(nn.Identity(), nn.Identity(), feat_dim=8, n_groups=3, hidden=5)
    assert isinstance(adv.adversary, DomainDiscriminator) and adv.adversary(torch.randn(2, 8)).shape == (2, 3)
    assert not hasattr(audit, "_Reverse")


def test_dev_risk_control_variate():
    from tltutor.dann import dev_risk
    assert dev_risk([3.0] * 5, [0.1, 0.2, 0.05, 0.3, 0.1]) == pytest.approx(3.0)    # constant loss: exact, whatever the weights
    assert dev_risk([1.0, 2.0, 3.0, 4.0], [1.0] * 4) == pytest.approx(2.5)          # equal weights: the plain mean
    l, w = np.array([1.0, 2.0, 3.0, 4.0]), np.array([0.2, 0.4, 0.6, 0.8])
    wl = w * l
    eta = -np.cov(wl, w)[0, 1] / w.var(ddof=1)
    assert dev_risk(torch.tensor(l), torch.tensor(w)) == pytest.approx(wl.mean() + eta * (w.mean() - 1))
    for losses, weights, msg in [([1.0, 2.0], [1.0], "one value per validation item"), ([1.0], [1.0], "at least 2"),
                                 ([1.0, float("nan")], [1.0, 1.0], "finite"), ([1.0, 2.0], [1.0, -0.5], "must be >= 0")]:
        with pytest.raises(ValueError, match=msg): dev_risk(losses, weights)


def test_density_ratio_recovers_gaussian_shift():
    from tltutor.dann import density_ratio, dev_risk
    rng = np.random.default_rng(1)
    xs, xt, xv = rng.normal(0, 1, 1500), rng.normal(1, 1, 1500), rng.normal(0, 1, 800)
    w = density_ratio(xs, xt, xv)
    assert w.shape == (800,) and (w > 0).all()
    assert np.corrcoef(w, np.exp(xv - 0.5))[0, 1] > 0.99 and abs(w.mean() - 1) < 0.15
    assert dev_risk(xv ** 2, w) > 1.4 > (xv ** 2).mean()          # moves the source risk (about 1) towards the target's 2
    with pytest.raises(ValueError, match="same feature extractor"): density_ratio(xs, xt, np.zeros((4, 3)))
    with pytest.raises(ValueError, match="must be positive numbers"): density_ratio(xs, xt, Cs=[0.1, -1])
    with pytest.raises(ValueError, match="folds"): density_ratio(xs, xt, folds=1)
