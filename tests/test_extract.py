"""tltutor.extract: feature cache keys and reuse, bad inputs, cross-checks against sklearn and the backbone itself.

Uses a random-initialised torchvision MobileNetV2 (structure only, no download) and tiny images, so it is fast and
needs no weights; the cache goes to a temporary $TLTUTOR_HOME."""
import json

import numpy as np
import pytest
import torch
import torchvision
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from tltutor.backbones import feature_extractor
from tltutor.data import ImageDataset, backbone_transform, subset_per_class
import tltutor.extract
from tltutor.extract import (BackboneFeatures, backbone_fingerprint, code_fingerprint, extract_features, extract_layers,
                             feature_cache_dir, feature_cache_path, linear_probe, probe_layers, select_layer,
                             subset_index, transform_fingerprint)

TFM = backbone_transform(32)


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("TLTUTOR_HOME", str(tmp_path))
    return tmp_path


def mnet(seed=0):
    torch.manual_seed(seed)
    return torchvision.models.mobilenet_v2().eval()


@pytest.fixture(scope="module")
def net(): return mnet(0)


def toy(n=12, seed=0, classes=3):
    g = torch.Generator().manual_seed(seed)
    return ImageDataset(torch.rand(n, 1, 28, 28, generator=g), torch.arange(n) % classes,
                        [f"c{i}" for i in range(classes)], "toy", "train")


class Counter:
    "Counts forward calls of a module."
    def __init__(self, module): self.n = 0; module.register_forward_hook(self)
    def __call__(self, *args): self.n += 1


def test_features_match_the_backbone_and_are_cached(net, home):
    ds = toy()
    calls = Counter(net.features[0])
    f = extract_features(net, ds, "stage3", TFM, batch_size=5, device="cpu", progress=False)
    assert f.shape == (12, 32) and f.dtype == np.float32 and calls.n == 3
    with torch.no_grad(): ref = feature_extractor(net, "stage3")(TFM(ds.x)).numpy()
    np.testing.assert_allclose(f, ref, atol=1e-5)
    calls.n = 3                                           # the by-hand check ran the stem once more
    files = list(feature_cache_dir().glob("*.npz"))
    assert len(files) == 1 and files[0].parent == home / "features"
    again = extract_features(net, ds, "stage3", TFM, device="cpu", progress=False)
    assert calls.n == 3                                   # cache hit: the backbone did not run
    np.testing.assert_array_equal(again, f)
    nocache = extract_features(net, ds, "stage3", TFM, device="cpu", cache=False, progress=False)
    assert calls.n == 4
    np.testing.assert_allclose(nocache, f, atol=1e-6)


def test_several_layers_come_from_one_pass(net):
    ds = toy()
    calls = Counter(net.features[0])
    out = extract_layers(net, ds, ["stem", "stage5", "final_conv"], TFM, device="cpu", progress=False)
    assert calls.n == 1 and {k: v.shape[1] for k, v in out.items()} == {"stem": 32, "stage5": 96, "final_conv": 1280}
    assert list(extract_layers(net, ds, None, TFM, device="cpu", progress=False)) == ["final_conv"]


def test_cache_key_changes_with_transform_layer_backbone_and_images(net):
    ds = toy()
    p, fields = feature_cache_path(net, "stage3", TFM, ds)
    assert set(fields) == {"backbone", "layer", "transform", "images", "code"}
    assert feature_cache_path(net, "stage3", backbone_transform(32), ds)[0] == p     # equal transform, equal key
    assert feature_cache_path(net, "stage3", backbone_transform(40), ds)[0] != p
    assert feature_cache_path(net, "stage3", backbone_transform(32, std=(0.5, 0.5, 0.5)), ds)[0] != p
    assert feature_cache_path(net, "stage4", TFM, ds)[0] != p
    assert feature_cache_path(mnet(1), "stage3", TFM, ds)[0] != p
    assert feature_cache_path(net, "stage3", TFM, ds.subset(range(6)))[0] != p
    assert feature_cache_path(net, "stage3", TFM, ds.x)[0] == p                      # same images, other container


def test_other_backbone_or_layer_never_reuses_a_cache(net):
    ds = toy()
    a = extract_features(net, ds, "stage3", TFM, device="cpu", progress=False)
    other = mnet(1)
    calls = Counter(other.features[0])
    b = extract_features(other, ds, "stage3", TFM, device="cpu", progress=False)
    assert calls.n == 1 and not np.allclose(a, b)
    c = extract_features(net, ds, "stage2", TFM, device="cpu", progress=False)
    assert c.shape[1] == 24


def test_a_renamed_cache_file_is_not_trusted(net):
    "A file written for another layer, copied under this layer's name, is detected by its stored key and recomputed."
    ds = toy()
    extract_features(net, ds, "stage2", TFM, device="cpu", progress=False)
    src, _ = feature_cache_path(net, "stage2", TFM, ds)
    dst, _ = feature_cache_path(net, "stage3", TFM, ds)
    for suffix in ("", ".sha256"):
        (dst.parent / (dst.name + suffix)).write_bytes((src.parent / (src.name + suffix)).read_bytes())
    with pytest.warns(UserWarning, match="recomputing"):
        f = extract_features(net, ds, "stage3", TFM, device="cpu", progress=False)
    assert f.shape[1] == 32


def _scale_class(k):
    "A transform class named `Scale` whose repr does not show its code: `k` is baked into the code, not the repr."
    ns = {}
    exec(f"class Scale:\n    def __repr__(self): return 'Scale()'\n    def __call__(self, x): return {k} * x.expand(-1, 3, -1, -1)\n", ns)
    return ns["Scale"]


def test_a_changed_transform_misses_the_cache(net):
    ds = toy()
    calls = Counter(net.features[0])
    old, new = _scale_class(1.0)(), _scale_class(2.0)()      # edited code behind an identical repr
    assert repr(old) == repr(new) and transform_fingerprint(old) != transform_fingerprint(new)
    f_old = extract_features(net, ds, "stage3", old, device="cpu", progress=False)
    n = calls.n
    assert np.array_equal(extract_features(net, ds, "stage3", _scale_class(1.0)(), device="cpu", progress=False), f_old)
    assert calls.n == n                                       # the same code again: a cache hit
    f_new = extract_features(net, ds, "stage3", new, device="cpu", progress=False)
    assert calls.n > n                                        # the edited transform: a miss, the backbone ran
    with torch.no_grad(): ref = feature_extractor(net, "stage3")(new(ds.x)).numpy()
    np.testing.assert_allclose(f_new, ref, atol=1e-5)
    assert not np.allclose(f_new, f_old)


def test_changed_feature_code_misses_the_cache(net, monkeypatch):
    ds = toy()
    calls = Counter(net.features[0])
    f = extract_features(net, ds, "stage3", TFM, device="cpu", progress=False)
    key = feature_cache_path(net, "stage3", TFM, ds)[1]["code"]
    assert key == code_fingerprint() and key.startswith("tltutor-")
    n = calls.n
    original = tltutor.extract.block_features
    def block_features(model, x, layers=None):                # the code that computes features changed
        return {k: 2 * v for k, v in original(model, x, layers).items()}
    monkeypatch.setattr(tltutor.extract, "block_features", block_features)
    assert code_fingerprint() != key
    g = extract_features(net, ds, "stage3", TFM, device="cpu", progress=False)
    assert calls.n > n                                        # not served the old code's features
    np.testing.assert_allclose(g, 2 * f, rtol=1e-5)
    monkeypatch.setattr(tltutor.extract, "block_features", original)
    assert code_fingerprint() == key
    np.testing.assert_array_equal(extract_features(net, ds, "stage3", TFM, device="cpu", progress=False), f)


def test_fine_tuning_changes_the_fingerprint():
    m = mnet(0)
    fp = backbone_fingerprint(m)
    with torch.no_grad(): m.classifier[1].bias[0] += 1
    assert backbone_fingerprint(m) != fp


def test_transform_fingerprints():
    def scale(x, s=2.0): return x * s
    assert " at 0x" not in transform_fingerprint(scale)
    size = 32
    f1 = lambda x: x + size                                          # noqa: E731
    size = 40
    f2 = lambda x: x + size                                          # noqa: E731
    assert transform_fingerprint(f1) == transform_fingerprint(f2)   # same code, same cell -> same (late binding)

    def make(k): return lambda x: x * k
    assert transform_fingerprint(make(1)) != transform_fingerprint(make(2))   # captured values are part of the key

    class NoRepr:
        def __call__(self, x): return x
    with pytest.raises(TypeError, match="cache_key"):
        transform_fingerprint(NoRepr())
    obj = NoRepr(); obj.cache_key = "identity-v1"
    assert transform_fingerprint(obj) == "identity-v1"


@pytest.mark.parametrize("bad, match", [
    (lambda: extract_features(mnet(), toy().subset([]), "stage3", TFM), "empty"),
    (lambda: extract_features(mnet(), toy(), "layer4", TFM), "choose from"),
    (lambda: extract_features(mnet(), toy(), ["stage3"], TFM), "extract_layers"),
    (lambda: extract_features(mnet(), {"x": 1}, "stage3", TFM), "cannot read images"),
    (lambda: extract_features(mnet(), np.zeros((2, 2)), "stage3", TFM), r"\(N, H, W\)"),
    (lambda: extract_features("resnet9000", toy(), None, TFM), "unknown backbone"),
    (lambda: extract_features(mnet(), toy(), "stage3", TFM, batch_size=0), "positive integer"),
])
def test_extract_bad_inputs(bad, match):
    with pytest.raises((ValueError, TypeError), match=match): bad()


def test_uint8_arrays_and_tensor_datasets_are_accepted(net):
    ds = toy()
    x8 = (ds.x[:, 0] * 255).round().to(torch.uint8).numpy()
    f_uint8 = extract_features(net, x8, "stage2", TFM, device="cpu", progress=False)
    f_float = extract_features(net, torch.utils.data.TensorDataset(torch.from_numpy(x8).float()[:, None] / 255, ds.y),
                               "stage2", TFM, device="cpu", progress=False)
    np.testing.assert_allclose(f_uint8, f_float, atol=1e-6)


def test_linear_probe_equals_sklearn_pipeline_and_rejects_bad_input():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(60, 8)); y = (X[:, 0] + 0.3 * rng.normal(size=60) > 0).astype(int)
    probe = linear_probe(X, y, C=0.5)
    ref = Pipeline([("s", StandardScaler()), ("lr", LogisticRegression(C=0.5, max_iter=2000))]).fit(X, y)
    np.testing.assert_allclose(probe.predict_proba(X), ref.predict_proba(X), atol=1e-6)
    assert probe.score(X, y) == ref.score(X, y) > 0.8
    with pytest.raises(ValueError, match="one label per row"): linear_probe(X, y[:-3])
    with pytest.raises(ValueError, match="empty"): linear_probe(X[:0], y[:0])
    with pytest.raises(ValueError, match="2-d array"): linear_probe(X[:, 0], y)
    with pytest.raises(ValueError, match="single class"): linear_probe(X, np.zeros(60, int))
    with pytest.raises(ValueError, match="positive number"): linear_probe(X, y, C=-1)


def test_feature_extractor_in_a_pipeline(net):
    ds = toy(30, classes=3)
    X = (ds.x[:, 0] * 255).round().to(torch.uint8).numpy()
    pipe = Pipeline([("features", BackboneFeatures(net, layer="stage4", size=32, device="cpu")),
                     ("clf", LogisticRegression(max_iter=500))]).fit(X, ds.y.numpy())
    assert pipe.predict(X).shape == (30,)
    direct = extract_features(net, X, "stage4", backbone_transform(32), device="cpu", progress=False)
    np.testing.assert_array_equal(pipe.named_steps["features"].transform(X), direct)
    with pytest.raises(ValueError, match="choose from"): BackboneFeatures(net, layer="head").fit(X)
    from sklearn.exceptions import NotFittedError
    with pytest.raises(NotFittedError): BackboneFeatures(net).transform(X)


def test_subset_index_matches_subset_per_class():
    ds = toy(40, classes=4)
    for k, seed in [(1, 0), (3, 5), (10, 2)]:
        idx = subset_index(ds, k, seed)
        assert torch.equal(ds.subset(idx).x, subset_per_class(ds, k, seed).x)
    with pytest.raises(ValueError, match="larger than the smallest class"): subset_index(ds, 11)
    with pytest.raises(TypeError, match="ImageDataset"): subset_index(ds.y, 2)


def test_probe_layers(net):
    train, test = toy(30, 0, classes=3), toy(15, 1, classes=3)
    res = probe_layers(net, ["stem", "stage2"], train, k=4, seeds=(0, 1), test=test, transform=TFM, device="cpu",
                       progress=False)
    assert list(res) == ["stem", "stage2"]
    assert all(len(r["valid"]) == 2 and len(r["test"]) == 2 for r in res.values())
    # by hand for one layer and seed: same subset, same probe
    idx = subset_index(train, 4, 0)
    f = extract_features(net, train, "stage2", TFM, device="cpu", progress=False)
    ft = extract_features(net, test, "stage2", TFM, device="cpu", progress=False)
    assert res["stage2"]["test"][0] == pytest.approx(linear_probe(f[idx], train.y[idx]).score(ft, test.y))
    with pytest.raises(ValueError, match="pass `test`"): probe_layers(net, ["stem"], train)
    with pytest.raises(ValueError, match="choose from"): probe_layers(net, ["stage99"], train, k=2)


def test_select_layer_is_sklearn_cross_validation_on_the_labelled_rows_only():
    rng = np.random.default_rng(1)
    y = np.repeat(np.arange(3), 6)
    feats = {"a": rng.normal(0, 1, (18, 5)), "b": rng.normal(0, 1, (18, 5)) + 1.5 * y[:, None], "c": rng.normal(0, 1, (18, 2))}
    layer, scores = select_layer(feats, y, folds=4, C=0.5, seed=3)
    cv = StratifiedKFold(4, shuffle=True, random_state=3)
    for l, X in feats.items():                                     # the same folds and probe as scikit-learn's own
        ref = cross_val_score(Pipeline([("s", StandardScaler()), ("lr", LogisticRegression(C=0.5, max_iter=2000))]), X, y, cv=cv)
        assert scores[l] == pytest.approx(ref.mean(), abs=1e-12)
    assert layer == max(scores, key=scores.get) == "b"
    # folds are capped by the smallest class (2 images per class -> 2 folds), and one image per class needs a default
    two = np.concatenate([np.flatnonzero(y == c)[:2] for c in range(3)])
    assert select_layer({l: X[two] for l, X in feats.items()}, y[two])[0] in feats
    one = two[::2]
    assert select_layer({l: X[one] for l, X in feats.items()}, y[one], default="c") == ("c", {l: pytest.approx(np.nan, nan_ok=True) for l in feats})
    with pytest.raises(ValueError, match="at least 2 per class"): select_layer({l: X[one] for l, X in feats.items()}, y[one])
    with pytest.raises(ValueError, match="must be one of the blocks"): select_layer(feats, y, default="z")
    with pytest.raises(TypeError, match="non-empty dict"): select_layer(feats["a"], y)
