"""Parameter-efficient fine-tuning helpers (tltutor.efficient): bad inputs, cross-checks against peft and plain torch,
identities (LoRA starts as the pretrained model; merged = unmerged; AdamW state = 8 bytes per trainable weight)."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tltutor.efficient import (bitfit, count_trainable, full_finetune, head_name, linear_probe, lora, merge_lora,
                               optimizer_state_bytes, pointwise_convs, saved_activation_bytes)


class _Tiny(nn.Module):
    "A small MobileNetV2-like CNN: pointwise expand -> depthwise -> pointwise project, BatchNorm, a linear head."
    def __init__(self, c=4, e=8, classes=3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU6())
        self.expand = nn.Sequential(nn.Conv2d(c, e, 1, bias=False), nn.BatchNorm2d(e), nn.ReLU6())
        self.dw = nn.Sequential(nn.Conv2d(e, e, 3, padding=1, groups=e, bias=False), nn.BatchNorm2d(e), nn.ReLU6())
        self.project = nn.Sequential(nn.Conv2d(e, c, 1, bias=False), nn.BatchNorm2d(c))
        self.head = nn.Linear(c, classes)
    def forward(self, x):
        x = self.stem(x)
        x = x + self.project(self.dw(self.expand(x)))
        return self.head(x.mean(dim=(2, 3)))


def _tiny(seed=0):
    torch.manual_seed(seed)
    return _Tiny()


def _x(n=4, seed=0):
    return torch.randn(n, 3, 6, 6, generator=torch.Generator().manual_seed(seed))


# --- which parameters each method trains ----------------------------------------------------------------------------
def test_pointwise_convs_and_head():
    m = _tiny()
    assert pointwise_convs(m) == ["expand.0", "project.0"]      # not the 3x3 stem, not the depthwise conv
    assert head_name(m) == "head"


def test_methods_train_what_they_say():
    m = _tiny()
    trained = lambda mm: {n for n, p in mm.named_parameters() if p.requires_grad}
    assert trained(linear_probe(copy.deepcopy(m))) == {"head.weight", "head.bias"}
    bn = {f"{k}.{i}.{w}" for k, i in [("stem", 1), ("expand", 1), ("dw", 1), ("project", 1)] for w in ("weight", "bias")}
    assert trained(bitfit(copy.deepcopy(m))) == {"head.weight", "head.bias"} | bn
    assert trained(full_finetune(linear_probe(copy.deepcopy(m)))) == {n for n, _ in m.named_parameters()}
    assert count_trainable(linear_probe(copy.deepcopy(m))) == 4 * 3 + 3


@pytest.mark.parametrize("fn", [linear_probe, bitfit, full_finetune, count_trainable, pointwise_convs, head_name,
                                merge_lora])
def test_not_a_module(fn):
    with pytest.raises(TypeError, match="needs a torch.nn.Module"):
        fn("mobilenet_v2")


def test_no_head():
    with pytest.raises(ValueError, match="no nn.Linear head"):
        linear_probe(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)))


# --- LoRA through peft ----------------------------------------------------------------------------------------------
def test_lora_counts_and_starts_as_pretrained():
    m = _tiny().eval()
    with torch.no_grad(): ref = m(_x())
    lm = lora(copy.deepcopy(m), r=2).eval()
    # r * (C_in + C_out) per pointwise conv, plus the head trained in full
    assert count_trainable(lm) == 2 * (4 + 8) + 2 * (8 + 4) + 4 * 3 + 3
    with torch.no_grad(): torch.testing.assert_close(lm(_x()), ref)   # B starts at zero


def test_lora_layer_equals_formula():
    lm = lora(_tiny(), r=2, alpha=6)
    layer = lm.base_model.model.expand[0]
    with torch.no_grad():
        nn.init.normal_(layer.lora_B["default"].weight, std=0.1)
        x = torch.randn(2, 4, 5, 5)
        A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        W = layer.base_layer.weight
        manual = F.conv2d(x, W + 3.0 * (B.flatten(1) @ A.flatten(1)).view_as(W))   # (alpha / r) B A added to W
        torch.testing.assert_close(layer(x), manual, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kw, msg", [
    (dict(r=0), "r=0 must be a positive integer"),
    (dict(r=-1), "must be a positive integer"),
    (dict(r=1.5), "must be a positive integer"),
    (dict(r=True), "must be a positive integer"),
    (dict(alpha=0), "alpha=0 must be"),
    (dict(dropout=1.0), "dropout=1.0 must be"),
    (dict(targets=["nope"]), r"Its pointwise convolutions are \['expand.0', 'project.0'\]"),
    (dict(targets="stem.1"), "its linear layers are \\['head'\\]"),
    (dict(targets=[]), "match no nn.Conv2d"),
])
def test_lora_bad_inputs(kw, msg):
    with pytest.raises(ValueError, match=msg):
        lora(_tiny(), **kw)


def test_merge_equals_unmerged_and_twice_fails():
    lm = lora(_tiny(), r=2)
    with torch.no_grad():
        for n, p in lm.named_parameters():
            if "lora_B" in n: nn.init.normal_(p, std=0.1)
    lm.eval()
    with torch.no_grad(): before = lm(_x())
    merged = merge_lora(lm)
    assert type(merged) is _Tiny
    assert [type(m) for m in merged.modules()] == [type(m) for m in _tiny().modules()]
    with torch.no_grad(): torch.testing.assert_close(merged.eval()(_x()), before, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="merged already"):
        merge_lora(merged)
    with pytest.raises(ValueError, match="no LoRA layers"):
        merge_lora(_tiny())


def test_merge_after_merge_adapter():
    lm = lora(_tiny(), r=2)
    lm.merge_adapter()
    with pytest.raises(ValueError, match="unmerge them first"):
        merge_lora(lm)


# --- memory ----------------------------------------------------------------------------------------------------------
def test_optimizer_state_is_two_moments():
    m = bitfit(_tiny())
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad])
    assert optimizer_state_bytes(opt) == 0
    F.cross_entropy(m(_x()), torch.tensor([0, 1, 2, 0])).backward(); opt.step()
    assert optimizer_state_bytes(opt) == 8 * count_trainable(m)
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        optimizer_state_bytes(m)


def test_saved_activations_frozen_prefix_saves_nothing():
    y = torch.tensor([0, 1, 2, 0])
    full = saved_activation_bytes(full_finetune(_tiny()), _x(), y)
    probe = saved_activation_bytes(linear_probe(_tiny()), _x(), y)
    bf = saved_activation_bytes(bitfit(_tiny()), _x(), y)
    # the probe keeps only the head's input (4 x 4 floats) and what the loss keeps (log-probabilities, targets, a total)
    assert probe == 4 * 4 * 4 + 4 * 3 * 4 + 4 * 8 + 4
    assert probe < bf <= full
    m = _tiny()
    saved_activation_bytes(full_finetune(m), _x(), y)
    assert all(p.grad is None for p in m.parameters())   # gradients cleared


@pytest.mark.parametrize("x, msg", [(torch.empty(0, 3, 6, 6), "non-empty batch"), ([1, 2], "non-empty batch")])
def test_saved_activations_bad_inputs(x, msg):
    with pytest.raises(ValueError, match=msg):
        saved_activation_bytes(_tiny(), x, torch.tensor([0]))


def test_saved_activations_nothing_trainable():
    m = _tiny().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        saved_activation_bytes(m, _x(), torch.tensor([0, 1, 2, 0]))
