"Bias-audit helpers: cross-checks against fairlearn (dev dependency only), bootstrap intervals, GRL identities, bad inputs."
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tltutor.audit import (AdversarialDebiasing, AdversaryLoss, GradientReversal, GroupMetrics, audit_report,
                           demographic_parity_difference, equalized_odds_difference, expected_calibration_error,
                           grad_reverse, group_balanced_sampler, group_calibration, group_labels, group_metrics,
                           textured_groups, worst_class_equalized_odds)
from tltutor.core import fit, seed_everything
from tltutor.data import ImageDataset

fl = pytest.importorskip("fairlearn.metrics")
pd = pytest.importorskip("pandas")
from sklearn.metrics import accuracy_score


def _random_binary(n=600, seed=0, n_groups=4):
    rng = np.random.default_rng(seed)
    g = rng.choice([f"g{i}" for i in range(n_groups)], size=n)
    yt = rng.integers(0, 2, n)
    # group-dependent error rates so the differences are not all zero
    flip = rng.random(n) < np.array([0.1, 0.2, 0.3, 0.4])[np.char.replace(g, "g", "").astype(int) % 4]
    yp = np.where(flip, 1 - yt, yt)
    return yt, yp, g


FL_METRICS = {"accuracy": accuracy_score, "selection_rate": fl.selection_rate,
              "true_positive_rate": fl.true_positive_rate, "false_positive_rate": fl.false_positive_rate}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_group_metrics_equal_fairlearn_metricframe(seed):
    yt, yp, g = _random_binary(seed=seed)
    gm = group_metrics(yt, yp, g, metrics=list(FL_METRICS), n_boot=0)
    mf = fl.MetricFrame(metrics=FL_METRICS, y_true=yt, y_pred=yp, sensitive_features=g)
    for m in FL_METRICS:
        assert gm.overall[m] == pytest.approx(mf.overall[m], abs=1e-12)
        for grp in gm.groups: assert gm.by_group[grp][m] == pytest.approx(mf.by_group.loc[grp, m], abs=1e-12)
        assert gm.difference[m] == pytest.approx(mf.difference()[m], abs=1e-12)
        assert gm.ratio[m] == pytest.approx(mf.ratio()[m], abs=1e-12)
    assert gm.n == {grp: int((g == grp).sum()) for grp in gm.groups}


def test_intersectional_groups_equal_fairlearn():
    rng = np.random.default_rng(3)
    n = 800
    a, b = rng.choice(["x", "y"], n), rng.choice(["p", "q", "r"], n)
    yt = rng.integers(0, 3, n); yp = np.where(rng.random(n) < 0.3, rng.integers(0, 3, n), yt)
    gm = group_metrics(yt, yp, {"a": a, "b": b}, n_boot=0)
    mf = fl.MetricFrame(metrics=accuracy_score, y_true=yt, y_pred=yp, sensitive_features=pd.DataFrame({"a": a, "b": b}))
    assert gm.attributes == ["a", "b"] and len(gm.groups) == 6
    for grp in gm.groups: assert gm.by_group[grp]["accuracy"] == pytest.approx(mf.by_group.loc[grp], abs=1e-12)
    assert gm.difference["accuracy"] == pytest.approx(mf.difference(), abs=1e-12)
    assert gm.ratio["accuracy"] == pytest.approx(mf.ratio(), abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
def test_parity_and_odds_equal_fairlearn(seed):
    yt, yp, g = _random_binary(seed=seed)
    assert demographic_parity_difference(yt, yp, g) == pytest.approx(
        fl.demographic_parity_difference(yt, yp, sensitive_features=g), abs=1e-12)
    for agg in ("worst_case", "mean"):
        assert equalized_odds_difference(yt, yp, g, agg=agg) == pytest.approx(
            fl.equalized_odds_difference(yt, yp, sensitive_features=g, agg=agg), abs=1e-12)


def test_one_vs_rest_equalized_odds():
    rng = np.random.default_rng(5)
    yt = rng.integers(0, 4, 500); yp = np.where(rng.random(500) < 0.25, rng.integers(0, 4, 500), yt)
    g = rng.integers(0, 3, 500)
    per_class = [fl.equalized_odds_difference((yt == c).astype(int), (yp == c).astype(int), sensitive_features=g)
                 for c in range(4)]
    for c in range(4): assert equalized_odds_difference(yt, yp, g, pos_label=c) == pytest.approx(per_class[c], abs=1e-12)
    val, cls = worst_class_equalized_odds(yt, yp, g)
    assert val == pytest.approx(max(per_class)) and cls == int(np.argmax(per_class))


def test_intervals_contain_estimate_and_shrink_with_n():
    widths = []
    for n in (200, 5000):
        yt, yp, g = _random_binary(n=n, seed=7)
        gm = group_metrics(yt, yp, g, metrics=("accuracy", "selection_rate"), n_boot=400, seed=0)
        for m in gm.metrics:
            for grp in gm.groups:
                lo, hi = gm.ci[m][grp]
                assert lo <= gm.by_group[grp][m] <= hi
            lo, hi = gm.difference_ci[m]
            assert lo <= gm.difference[m] <= hi
        widths.append(np.mean([gm.ci["accuracy"][grp][1] - gm.ci["accuracy"][grp][0] for grp in gm.groups]))
    assert widths[1] < widths[0] / 3  # 25x more items -> about 5x narrower


def test_gap_interval_covers_zero_without_a_real_gap():
    "With groups unrelated to the errors, the signed-gap interval covers 0 in about 95% of data sets (not always)."
    covered = 0
    for seed in range(30):
        rng = np.random.default_rng(seed)
        yt = rng.integers(0, 2, 1000); yp = np.where(rng.random(1000) < 0.2, 1 - yt, yt)
        g = rng.integers(0, 2, 1000)
        lo, hi = group_metrics(yt, yp, g, n_boot=200, seed=seed).difference_ci["accuracy"]
        covered += lo < 0 < hi
    assert covered >= 25, covered


def test_bad_inputs():
    yt, yp, g = _random_binary(n=50)
    with pytest.raises(ValueError, match="aligned item by item"): group_metrics(yt, yp[:40], g)
    with pytest.raises(ValueError, match="one group value per item"): group_metrics(yt, yp, g[:40])
    with pytest.raises(ValueError, match="needs binary labels"): group_metrics(yt * 2, yp, g, metrics="true_positive_rate")
    with pytest.raises(ValueError, match="needs binary labels"): demographic_parity_difference(yt + 1, yp, g)
    with pytest.raises(ValueError, match="missing value"): group_metrics(yt, np.where(yp == 1, np.nan, 0.0), g)
    with pytest.raises(ValueError, match="missing value"): group_metrics(yt, yp, np.array([None] + list(g[1:]), dtype=object))
    with pytest.raises(ValueError, match="n_boot"): group_metrics(yt, yp, g, n_boot=-1)
    with pytest.raises(TypeError, match="name or a callable"): group_metrics(yt, yp, g, metrics=[3])
    with pytest.raises(ValueError, match="no positive items"): equalized_odds_difference([0, 0, 1, 1], [0, 1, 1, 1], [0, 0, 1, 1])


def test_tiny_group_warns_and_reports_n():
    with pytest.warns(UserWarning, match="has only 1 item"):
        gm = group_metrics([1, 0, 1, 1, 0], [1, 0, 0, 1, 0], ["a", "a", "a", "a", "b"], n_boot=50)
    assert gm.n["b"] == 1 and all(math.isnan(v) for v in gm.ci["accuracy"]["b"])
    assert "| b | 1 |" in audit_report(gm, model="m", data="d")


def test_ece_matches_direct_loop():
    rng = np.random.default_rng(0)
    logits = torch.tensor(rng.normal(size=(300, 4)) * 2)
    p = logits.softmax(1).numpy(); y = rng.integers(0, 4, 300)
    conf, pred = p.max(1), p.argmax(1)
    edges = np.linspace(0, 1, 11); ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (conf > lo) & (conf <= hi)
        if sel.any(): ece += sel.mean() * abs((pred[sel] == y[sel]).mean() - conf[sel].mean())
    assert expected_calibration_error(y, p, n_bins=10) == pytest.approx(ece, abs=1e-12)
    cal = group_calibration(y, p, y % 2, n_bins=10)
    assert set(cal["by_group"]) == {0, 1} and cal["difference"] >= 0
    with pytest.raises(ValueError, match="not raw logits"): expected_calibration_error(y, logits.numpy())


def test_grad_reverse_identities():
    x = torch.randn(4, 3, requires_grad=True); w = torch.randn(4, 3)
    out = grad_reverse(x, 0.7)
    assert torch.equal(out, x)
    (out * w).sum().backward()
    assert torch.allclose(x.grad, -0.7 * w)
    layer = GradientReversal(); layer.lambda_ = 0
    x.grad = None; (layer(x) * w).sum().backward(); assert torch.count_nonzero(x.grad) == 0
    with pytest.raises(ValueError, match=">= 0"): GradientReversal(-1)
    with pytest.raises(ValueError, match=">= 0"): grad_reverse(x, float("nan"))
    with pytest.raises(TypeError, match="needs a tensor"): grad_reverse([1.0])


def test_adversary_trains_through_fit():
    seed_everything(0)
    x = torch.randn(256, 6); grp = (x[:, 0] > 0).long(); y = (x[:, 1] > 0).long()
    model = AdversarialDebiasing(nn.Sequential(nn.Linear(6, 16), nn.ReLU()), nn.Linear(16, 2), feat_dim=16)
    dl = DataLoader(TensorDataset(x, y, grp), batch_size=32, shuffle=True)
    h = fit(model, dl, valid_dl=dl, epochs=3, lr=1e-2, callbacks=[AdversaryLoss(1.0)], progress=False)
    assert {"adv_loss", "adv_acc", "lambda_", "accuracy"} <= set(h.columns)
    with pytest.raises(ValueError, match=r"\(x, y, group\)"):
        fit(model, DataLoader(TensorDataset(x, y), batch_size=32), callbacks=[AdversaryLoss()], progress=False)


def test_group_balanced_sampler_and_textured_groups():
    g = np.array([0] * 95 + [1] * 5)
    drawn = g[list(group_balanced_sampler(g, num_samples=2000, seed=0))]
    assert abs(drawn.mean() - 0.5) < 0.05
    ds = ImageDataset(torch.rand(40, 1, 28, 28), torch.arange(40) % 4, list("abcd"))
    t = textured_groups(ds, 0.5, seed=0)
    x, y, grp = t.tensors
    assert x.shape == (40, 3, 28, 28) and torch.equal(y, ds.y) and 0 < int(grp.sum()) < 40
    assert torch.equal(x[grp == 0], ds.x[grp == 0].expand(-1, 3, -1, -1))
    with pytest.raises(TypeError, match="grey ImageDataset"): textured_groups(TensorDataset(torch.rand(2, 1)), 0.5)


def test_audit_report_saved_atomically(tmp_path, monkeypatch):
    monkeypatch.setenv("TLTUTOR_RESULTS", str(tmp_path))
    yt, yp, g = _random_binary(n=200)
    gm = group_metrics(yt, yp, g, n_boot=100)
    text = audit_report({"before": gm, "after": gm}, model="m", data="d", fmt="html", path="card.html")
    assert (tmp_path / "card.html").read_text() == text and text.startswith("<!doctype html>")
    md = audit_report(gm, model="m", data="d", extra={"eo": {"before": 0.1}}, caveats=["c1"])
    assert "## Four-fifths check" in md and "- c1" in md and "| eo | 0.100 |" in md
    with pytest.raises(ValueError, match="'markdown' or 'html'"): audit_report(gm, model="m", data="d", fmt="pdf")


def test_group_labels_forms():
    codes, labels, names = group_labels(torch.tensor([[0, 1], [0, 1], [1, 0]]))
    assert labels == [(0, 1), (1, 0)] and names == ["attr0", "attr1"] and codes.tolist() == [0, 0, 1]
    with pytest.raises(ValueError, match="empty dict"): group_labels({})
