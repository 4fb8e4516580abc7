"""Test-time adaptation helpers (tltutor.tta): bad inputs, cross-checks against torch/torchvision/scipy, identities."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tltutor.tta import (CORRUPTIONS, TestTimeAdapter, TestTimeBN, bn_cnn, corrupt, prediction_entropy, run_stream,
                         stream_order)


def _trained_bn(c=3, seed=0):
    torch.manual_seed(seed)
    bn = nn.BatchNorm2d(c)
    bn.train()(torch.randn(32, c, 5, 5) * 3 + 1)
    return bn.eval()


def _toy(seed=0):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 16, 3))
    m.train()(torch.randn(64, 1, 6, 6))
    return m.eval()


# --- corrupt ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, msg", [
    (dict(name="fog", severity=1), "known: gaussian_noise, blur, contrast"),
    (dict(name="blur", severity=0), "from 1 (mildest) to 5"),
    (dict(name="blur", severity=2.0), "from 1 (mildest) to 5"),
    (dict(name="blur", severity=True), "from 1 (mildest) to 5"),
])
def test_corrupt_bad_inputs(kw, msg):
    with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        corrupt(torch.rand(2, 1, 8, 8), **kw)


@pytest.mark.parametrize("x", [np.zeros((2, 1, 8, 8)), torch.zeros(1, 8, 8), torch.zeros(2, 1, 8, 8, dtype=torch.uint8)])
def test_corrupt_bad_images(x):
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        corrupt(x, "contrast", 1)


def test_blur_matches_torchvision():
    from torchvision.transforms import GaussianBlur
    x = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(corrupt(x, "blur", 5), GaussianBlur(13, sigma=2.0)(x).clamp(0, 1))


def test_corruptions_get_stronger():
    x = torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    for name in CORRUPTIONS:
        dist = [float((corrupt(x, name, s) - x).abs().mean()) for s in range(1, 6)]
        assert dist == sorted(dist), (name, dist)


# --- TestTimeBN ------------------------------------------------------------------------------------------------------
def test_testtimebn_identities():
    bn = _trained_bn()
    x = torch.randn(6, 3, 5, 5) * 2 - 1
    train_mode = F.batch_norm(x, None, None, bn.weight, bn.bias, training=True, eps=bn.eps)
    torch.testing.assert_close(TestTimeBN(bn)(x), train_mode, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(TestTimeBN(bn, prior=1e9)(x), bn(x), atol=1e-4, rtol=1e-4)
    # prior N with a batch of n: the statistics are the (N, n)-weighted mixture
    n, N = len(x), 6.0
    w = N / (N + n)
    mu = w * bn.running_mean + (1 - w) * x.mean((0, 2, 3))
    var = w * bn.running_var + (1 - w) * x.var((0, 2, 3), unbiased=False)
    torch.testing.assert_close(TestTimeBN(bn, prior=N)(x), F.batch_norm(x, mu, var, bn.weight, bn.bias, eps=bn.eps),
                               atol=1e-5, rtol=1e-5)


def test_testtimebn_momentum_is_a_moving_average():
    bn = _trained_bn()
    tbn = TestTimeBN(bn, momentum=0.25)
    x1, x2 = torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5) + 2
    tbn(x1); tbn(x2)
    m = bn.running_mean
    for x in (x1, x2): m = 0.75 * m + 0.25 * x.mean((0, 2, 3))
    torch.testing.assert_close(tbn.mean, m, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kw, err, msg", [
    (dict(bn=nn.BatchNorm1d(3)), TypeError, "trained nn.BatchNorm2d"),
    (dict(prior=-1), ValueError, "number >= 0"),
    (dict(prior=math.inf), ValueError, "prior=inf must be a finite number"),
    (dict(momentum=1.5), ValueError, r"in \(0, 1\]"),
    (dict(momentum=True), ValueError, "momentum=True must be a finite number"),
])
def test_testtimebn_bad_inputs(kw, err, msg):
    bn = kw.pop("bn", _trained_bn())
    with pytest.raises(err, match=msg):
        TestTimeBN(bn, **kw)


# --- prediction_entropy ----------------------------------------------------------------------------------------------
def test_entropy_matches_scipy():
    from scipy.stats import entropy
    z = torch.randn(20, 7, generator=torch.Generator().manual_seed(0)) * 3
    torch.testing.assert_close(prediction_entropy(z), torch.tensor(entropy(z.softmax(1).numpy(), axis=1)).float(),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("z", [torch.zeros(5), torch.zeros(2, 3, dtype=torch.long), [[0.0, 1.0]]])
def test_entropy_bad_inputs(z):
    with pytest.raises(ValueError, match=r"shape \(n, classes\)"):
        prediction_entropy(z)


# --- TestTimeAdapter -------------------------------------------------------------------------------------------------
def test_adapter_source_and_bn():
    m, x = _toy(), torch.randn(16, 1, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(TestTimeAdapter(m, "source", device="cpu")(x), m(x))
        ref = m.train()(x); m.eval()   # BatchNorm in training mode = batch statistics (running stats change, unused)
    torch.testing.assert_close(TestTimeAdapter(_toy(), "bn", device="cpu")(x), ref, atol=1e-5, rtol=1e-5)


def test_tent_updates_only_bn_affine_and_not_the_original():
    m = _toy()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    ad = TestTimeAdapter(m, "tent", lr=0.05, device="cpu")
    for _ in range(3): ad(torch.randn(16, 1, 6, 6))
    for k, v in m.state_dict().items(): torch.testing.assert_close(v, before[k])
    after = ad.model.state_dict()
    assert not torch.equal(after["1.weight"], before["1.weight"])
    torch.testing.assert_close(after["0.weight"], before["0.weight"])
    torch.testing.assert_close(after["4.weight"], before["4.weight"])


def test_tent_reset_restores():
    m, x = _toy(), torch.randn(16, 1, 6, 6)
    ad = TestTimeAdapter(m, "tent", lr=0.05, reset_every=2, device="cpu")
    first = ad(x); ad(x); third = ad(x)   # the third call starts from the trained state again
    torch.testing.assert_close(third, first)


@pytest.mark.parametrize("kw, err, msg", [
    (dict(method="adabn"), ValueError, "is not one of"),
    (dict(lr=-1), ValueError, "lr=-1 must be a positive number; the learning rate"),
    (dict(reset_every=0), ValueError, "1 = episodic"),
    (dict(reset_every=2.0), ValueError, "1 = episodic"),
    (dict(model="net"), TypeError, "torch.nn.Module"),
    (dict(model=nn.Linear(3, 2), method="tent"), ValueError, "has no nn.BatchNorm2d"),
])
def test_adapter_bad_inputs(kw, err, msg):
    model = kw.pop("model", _toy())
    with pytest.raises(err, match=msg):
        TestTimeAdapter(model, **kw)


# --- streams ---------------------------------------------------------------------------------------------------------
def test_stream_order():
    y = torch.arange(100) % 10
    for kind in ("shuffled", "sorted"):
        o = stream_order(y, kind, seed=3)
        assert sorted(o.tolist()) == list(range(100))
    s = y[stream_order(y, "sorted", seed=3)]
    assert int((s[1:] != s[:-1]).sum()) == 9
    with pytest.raises(ValueError, match="'shuffled' or 'sorted'"):
        stream_order(y, "random")


def test_run_stream_counts_and_bad_inputs():
    y = torch.tensor([0, 1, 2, 0, 1])
    oracle = lambda x: F.one_hot(x[:, 0].long(), 3).float()
    assert run_stream(oracle, y.float()[:, None], y, batch_size=2).tolist() == [2, 2, 1]
    with pytest.raises(ValueError, match="positive integer"):
        run_stream(oracle, y.float()[:, None], y, batch_size=0)
    with pytest.raises(ValueError, match="same, non-zero number"):
        run_stream(oracle, y.float()[:3, None], y)


def test_bn_cnn():
    net = bn_cnn(in_channels=3, width=4, n_classes=7)
    assert net(torch.zeros(2, 3, 28, 28)).shape == (2, 7)
    with pytest.raises(ValueError, match="positive integer"):
        bn_cnn(width=0)
