"""Transferability scores (tltutor.transferability): identities on tiny hand-computed cases, cross-checks against
scikit-learn / scipy / the naive formulas of the papers, invariances, and bad inputs."""
import numpy as np
import pytest
import torch
from scipy.optimize import minimize
from scipy.stats import entropy
from sklearn.metrics import mutual_info_score
from torch import nn

from tltutor.backbones import feature_extractor
from tltutor.fewshot import conv4
from tltutor.transferability import (_max_evidence, grey_transform, h_score, leep, logme, nce, rank_agreement,
                                     source_probs, transferability_scores)


def _data(n=60, d=4, seed=0):
    rng = np.random.default_rng(seed)
    f = rng.normal(size=(n, d)); y = np.arange(n) % 3; f[:, 0] += 2 * y
    return f, y


def _naive_evidence(f, t, alpha, beta):
    n, d = f.shape
    A = alpha * np.eye(d) + beta * f.T @ f
    m = beta * np.linalg.solve(A, f.T @ t)
    return (d / 2 * np.log(alpha) + n / 2 * np.log(beta) - 0.5 * np.linalg.slogdet(A)[1]
            - beta / 2 * ((t - f @ m) ** 2).sum() - alpha / 2 * m @ m - n / 2 * np.log(2 * np.pi)) / n


# --- LogME -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n, d", [(50, 3), (20, 40)])
def test_logme_is_the_maximum_of_the_evidence(n, d):
    f, y = _data(n, d, seed=1)
    u, s, _ = np.linalg.svd(f, full_matrices=False)
    best = []
    for c in range(3):
        t = (y == c).astype(float)
        r = minimize(lambda p: -_naive_evidence(f, t, np.exp(p[0]), np.exp(p[1])), [0.0, 0.0], method="Nelder-Mead",
                     options=dict(xatol=1e-10, fatol=1e-14, maxiter=20000))
        ev = _max_evidence(u, s ** 2, t, d, tol=1e-10)[0]
        assert ev == pytest.approx(-r.fun, abs=1e-7)
        assert ev >= -r.fun - 1e-9 or abs(ev + r.fun) < 1e-7
        best.append(-r.fun)
    assert logme(f, y, tol=1e-10) == pytest.approx(np.mean(best), abs=1e-7)


def test_logme_invariances_and_direction():
    f, y = _data()
    assert logme(f, (y + 1) % 3) == pytest.approx(logme(f, y))
    assert logme(f, np.array(["a", "b", "c"])[y]) == pytest.approx(logme(f, y))
    assert logme(torch.tensor(f), torch.tensor(y)) == pytest.approx(logme(f, y))
    assert logme(f, y) > logme(np.random.default_rng(5).normal(size=f.shape), y)


# --- LEEP and NCE ----------------------------------------------------------------------------------------------------
def test_leep_nce_hand_cases():
    y = np.array([0, 0, 1, 1, 2, 2]); z = np.array([1, 1, 0, 0, 2, 2])
    assert nce(z, y) == 0.0 and leep(np.eye(3)[z], y) == 0.0
    assert leep(np.full((6, 4), 0.25), y) == pytest.approx(-np.log(3))
    # z says "class 0 or 1" but not which: -H(Y|Z) = -(4/6) log 2
    assert nce([0, 0, 0, 0, 1, 1], y) == pytest.approx(-(4 / 6) * np.log(2))


def test_nce_matches_sklearn_and_leep_on_one_hot():
    rng = np.random.default_rng(0)
    z = rng.integers(0, 4, 300); y = (z + rng.integers(0, 2, 300)) % 3
    assert nce(z, y) == pytest.approx(mutual_info_score(y, z) - entropy(np.bincount(y) / len(y)), abs=1e-10)
    assert leep(np.eye(4)[z], y) == pytest.approx(nce(z, y))
    assert nce(z, (y + 2) % 3) == pytest.approx(nce(z, y)) and nce(z * 10, y) == pytest.approx(nce(z, y))
    p = rng.dirichlet(np.ones(4), 300)
    assert -np.log(3) - 1e-9 <= leep(p, y) <= 0


# --- H-score ---------------------------------------------------------------------------------------------------------
def test_h_score_formula_identities_and_saturation():
    f, y = _data()
    fc = f - f.mean(0); g = np.stack([fc[y == c].mean(0) for c in y])
    formula = np.trace(np.linalg.inv(fc.T @ fc / 60) @ (g.T @ g / 60))
    assert h_score(f, y) == pytest.approx(formula, abs=1e-9)
    assert h_score([[1.0], [1.0], [-1.0], [-1.0]], [0, 0, 1, 1]) == pytest.approx(1.0)
    assert h_score(f @ np.random.default_rng(1).normal(size=(4, 4)), y) == pytest.approx(h_score(f, y), abs=1e-9)
    assert h_score(np.random.default_rng(2).normal(size=(60, 100)), y) == pytest.approx(2.0)   # d >= n: C - 1


# --- bad inputs shared by the scores -----------------------------------------------------------------------------------
_F, _Y = _data()
@pytest.mark.parametrize("fn", [logme, h_score, leep])
@pytest.mark.parametrize("args, err, msg", [
    (lambda: (np.full((6, 3), np.nan), [0, 1] * 3), ValueError, "contains NaN"),
    (lambda: (np.full((6, 3), 1 / 3), [0] * 6), ValueError, "one class only"),
    (lambda: (np.full((5, 3), 1 / 3), [0, 1, 2, 3, 4]), ValueError, "at least 2 labelled items"),
    (lambda: (np.full((6, 3), 1 / 3), [0, 1, 2] * 2, 10), ValueError, "3 of num_classes=10"),
    (lambda: (np.full((6, 3), 1 / 3), [0, 1]), ValueError, "6 rows but y has 2"),
    (lambda: (np.ones(6), [0, 1] * 3), ValueError, "2-d array"),
    (lambda: (np.full((6, 3), 1 / 3), [0.5, 1] * 3), ValueError, "continuous values"),
])
def test_scores_bad_inputs(fn, args, err, msg):
    with pytest.raises(err, match=msg):
        fn(*args())


def test_leep_refuses_logits_and_nce_refuses_missing():
    with pytest.raises(ValueError, match="must hold probabilities"):
        leep(np.log(np.full((6, 3), 1 / 3)), [0, 1] * 3)
    with pytest.raises(ValueError, match="missing value"):
        nce([0, 1, np.nan, 1], [0, 1, 0, 1])


# --- zoo helpers -----------------------------------------------------------------------------------------------------
def test_small_cnn_source_probs_and_transform():
    m, x = conv4(hidden=32, num_classes=4, pool="mean", channels_last=False).eval(), torch.rand(6, 1, 28, 28)
    with torch.no_grad(): feats, logits = feature_extractor(m, "block4")(x), m(x)
    assert np.allclose(source_probs(m, feats), torch.softmax(logits, 1).numpy(), atol=1e-5)
    assert grey_transform()(torch.rand(2, 3, 8, 8)).shape == (2, 1, 28, 28)
    with pytest.raises(ValueError, match="num_classes=0"): conv4(num_classes=0, pool="mean")
    with pytest.raises(TypeError, match="needs an image tensor"): grey_transform()(np.zeros((1, 8, 8)))
    with pytest.raises(TypeError, match="layer_groups knows"): source_probs(nn.Linear(2, 2), feats)


def test_scores_dict_and_rank_agreement():
    f, y = _data()
    s = transferability_scores(f, y, np.full((60, 5), 0.2))
    assert s["leep"] == pytest.approx(-np.log(3)) and s["logme"] == pytest.approx(logme(f, y))
    assert set(s["seconds"]) == {"logme", "hscore", "leep", "nce"}
    assert rank_agreement({"a": 1, "b": 2, "c": 3}, {"a": 3, "b": 2, "c": 1}) == -1.0
    with pytest.raises(ValueError, match="at least 3 candidates"): rank_agreement({"a": 1}, {"a": 1})
