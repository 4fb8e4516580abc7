"""tltutor.fewshot: episode sampling, prototypes, ProtoNet, meta-training through core.fit, fast episode evaluation.

Synthetic data only (no glyphs, no network), so these run in a few seconds anywhere."""
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from tltutor.core import seed_everything
from tltutor.fewshot import (EpisodeSampler, EpisodeScore, ProtoNet, conv4, embed_dataset, evaluate_episodes,
                             proto_logits, prototypes, train_protonet)


def blobs(n_classes=10, per_class=20, dim=8, sep=3.0, seed=0):
    "Gaussian blobs: class c centred at sep * e_c (dim >= n_classes) or at a random point."
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n_classes).repeat_interleave(per_class)
    centres = sep * torch.randn(n_classes, dim, generator=g)
    return centres[y] + torch.randn(len(y), dim, generator=g), y


# ---------- EpisodeSampler ----------

def test_episode_layout_labels_and_disjointness():
    x, y = blobs(n_classes=12, per_class=9)
    s = EpisodeSampler(y, n_way=4, k_shot=2, n_query=3, episodes=50, seed=1)
    assert len(s) == 50 and len(list(s)) == 50
    for ep in s:
        assert len(ep) == 4 * (2 + 3) and len(set(ep)) == len(ep)           # support and query disjoint
        cls = y[ep]
        support, query = cls[:8], cls[8:]
        assert support.unique().numel() == 4
        assert torch.equal(support, support[::2].repeat_interleave(2))        # class by class
        assert torch.equal(query, support[::2].repeat_interleave(3))          # same class order
    (xb, ys), yq = next(iter(s.loader(TensorDataset(x, y))))
    assert ys.tolist() == [0, 0, 1, 1, 2, 2, 3, 3] and yq.tolist() == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3
    assert xb.shape == (20, 8)
    support_lab, query_lab = s.episode_labels()
    assert torch.equal(support_lab, ys) and torch.equal(query_lab, yq)


def test_sampler_covers_classes_and_is_reproducible():
    _, y = blobs(n_classes=6, per_class=5)
    a = EpisodeSampler(y, 3, 1, 2, episodes=200, seed=3)
    b = EpisodeSampler(y, 3, 1, 2, episodes=200, seed=3)
    assert list(a) == list(b)
    assert list(a) != list(a)                       # a second pass draws new episodes...
    f = EpisodeSampler(y, 3, 1, 2, episodes=5, seed=3, fixed=True)
    assert list(f) == list(f)                       # ...unless fixed=True
    idx = EpisodeSampler(y, 3, 1, 2, seed=0).sample(500)
    assert set(y[idx.ravel()].tolist()) == set(range(6))
    assert set(idx.ravel().tolist()) == set(range(30))   # every item gets drawn


def test_sampler_accepts_datasets_and_noncontiguous_labels():
    x = torch.randn(30, 2)
    y = torch.tensor([7, 42, 1000]).repeat_interleave(10)
    for labels in (y, y.numpy(), y.tolist(), TensorDataset(x, y), (x, y)):
        s = EpisodeSampler(labels, n_way=3, k_shot=2, n_query=1)
        assert sorted(s.classes.tolist()) == [7, 42, 1000]
    (xb, ys), yq = next(iter(EpisodeSampler(y, 3, 2, 1).loader(TensorDataset(x, y))))
    assert set(ys.tolist()) == {0, 1, 2}


def test_sampler_bad_inputs():
    _, y = blobs(n_classes=5, per_class=4)
    with pytest.raises(ValueError, match="n_way=6 is larger than the number of classes"):
        EpisodeSampler(y, n_way=6)
    y2 = torch.cat([y, torch.tensor([9, 9])])   # class 9 has only 2 items
    with pytest.raises(ValueError, match=r"fewer than k_shot \+ n_query = 3 examples \(class 9 has 2\)"):
        EpisodeSampler(y2, n_way=3, k_shot=1, n_query=2)
    with pytest.raises(ValueError, match="zero-shot"):
        EpisodeSampler(y, n_way=3, k_shot=0)
    with pytest.raises(ValueError, match="n_way=1 must be an integer >= 2"):
        EpisodeSampler(y, n_way=1)
    with pytest.raises(TypeError, match="integer class ids"):
        EpisodeSampler(torch.rand(10), n_way=2)
    with pytest.raises(ValueError, match="use it with batch_sampler"):
        EpisodeSampler(y, 2, 1, 1).collate([(torch.zeros(1), torch.tensor(0))])


# ---------- prototypes and logits ----------

def test_prototypes_are_class_means():
    x, y = blobs(n_classes=4, per_class=6)
    p = prototypes(x, y)
    for c in range(4): torch.testing.assert_close(p[c], x[y == c].mean(0))
    with pytest.raises(ValueError, match=r"classes \[2\] have no support example"):
        prototypes(x[y != 2], y[y != 2], n_way=4)
    with pytest.raises(ValueError, match="must lie in 0..1"):
        prototypes(x, y, n_way=2)
    with pytest.raises(ValueError, match=r"embeddings \(n, d\) and labels \(n,\)"):
        prototypes(x[:3], y)


def test_proto_logits_match_cdist_and_cosine():
    q, p = torch.randn(7, 5), torch.randn(3, 5)
    torch.testing.assert_close(proto_logits(q, p), -torch.cdist(q, p) ** 2, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(proto_logits(q, p, "cosine", scale=1.0),
                               F.cosine_similarity(q[:, None], p[None], dim=-1), atol=1e-6, rtol=1e-5)
    # batched over episodes
    qb, pb = torch.randn(4, 7, 5), torch.randn(4, 3, 5)
    out = proto_logits(qb, pb)
    for e in range(4): torch.testing.assert_close(out[e], proto_logits(qb[e], pb[e]))
    with pytest.raises(ValueError, match="choose one of"):
        proto_logits(q, p, distance="l1")
    with pytest.raises(ValueError, match="same encoder"):
        proto_logits(q, torch.randn(3, 4))


def test_sqeuclidean_protonet_is_a_linear_classifier():
    "softmax(-|f - c_k|^2) == softmax(2 c_k.f - |c_k|^2): the linear-head view from the notebook."
    q, p = torch.randn(6, 4), torch.randn(5, 4)
    linear = q @ (2 * p).T - (p ** 2).sum(1)
    torch.testing.assert_close(proto_logits(q, p).softmax(1), linear.softmax(1), atol=1e-5, rtol=1e-4)


# ---------- ProtoNet ----------

def test_identity_protonet_equals_nearest_class_mean():
    from sklearn.neighbors import NearestCentroid
    x, y = blobs(n_classes=8, per_class=12, sep=1.5)
    s = EpisodeSampler(y, n_way=5, k_shot=3, n_query=4, episodes=30, seed=0)
    net = ProtoNet(nn.Identity())
    for (xb, ys), yq in s.loader(TensorDataset(x, y)):
        pred = net(xb, ys).argmax(1).numpy()
        ref = NearestCentroid().fit(xb[:len(ys)].numpy(), ys.numpy()).predict(xb[len(ys):].numpy())
        np.testing.assert_array_equal(pred, ref)
        torch.testing.assert_close(net((xb, ys)), net(xb, ys))             # tuple form, as fit passes it


def test_protonet_bad_inputs():
    net = ProtoNet(nn.Identity())
    with pytest.raises(TypeError, match="needs the support labels"):
        net(torch.zeros(4, 2))
    with pytest.raises(ValueError, match="no queries left"):
        net(torch.zeros(2, 2), torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="must be a torch.nn.Module"):
        ProtoNet(lambda x: x)
    with pytest.raises(ValueError, match="choose one of"):
        ProtoNet(nn.Identity(), distance="euclid")


def test_conv4_shapes_and_head():
    assert conv4(hidden=32)(torch.zeros(3, 1, 28, 28)).shape == (3, 32)
    assert conv4(hidden=64)(torch.zeros(3, 1, 84, 84)).shape == (3, 64 * 5 * 5)
    assert conv4(in_channels=3, hidden=8, num_classes=5)(torch.zeros(2, 3, 28, 28)).shape == (2, 5)
    assert conv4(hidden=8, num_classes=5, image_size=84)(torch.zeros(2, 1, 84, 84)).shape == (2, 5)
    with pytest.raises(ValueError, match="blocks=0"):
        conv4(blocks=0)
    with pytest.raises(ValueError, match="num_classes=0"):
        conv4(num_classes=0)


# ---------- train_protonet (through core.fit) ----------

def test_train_protonet_uses_fit_and_learns():
    "Classes differ in 4 signal dims, 12 noisy dims hide them: meta-training must learn to ignore the noise."
    seed_everything(0)
    g = torch.Generator().manual_seed(1)
    y = torch.arange(30).repeat_interleave(10)
    centres = 2.0 * torch.randn(30, 4, generator=g)
    x = torch.cat([centres[y] + 0.5 * torch.randn(len(y), 4, generator=g), 3.0 * torch.randn(len(y), 12, generator=g)], 1)
    train, test = TensorDataset(x[y < 20], y[y < 20]), (x[y >= 20], y[y >= 20])   # new classes at test time
    enc = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    before = evaluate_episodes(enc, test, 5, 1, episodes=200, n_query=5, device="cpu").accuracy
    model, hist = train_protonet(enc, train, n_way=10, k_shot=1, n_query=5, episodes=200, epochs=2, lr=1e-2,
                                 valid_ds=TensorDataset(*test), valid_episodes=10, device="cpu", progress=False)
    after = evaluate_episodes(model.encoder, test, 5, 1, episodes=200, n_query=5, device="cpu").accuracy
    assert isinstance(model, ProtoNet) and model.encoder is enc
    assert hist.columns[:4] == ["epoch", "train_loss", "valid_loss", "accuracy"] and len(hist) == 2
    assert hist["train_loss"][-1] < hist["train_loss"][0]
    assert after > before + 0.15, (before, after)


def test_train_protonet_bad_inputs():
    x, y = blobs(n_classes=4, per_class=6)
    ds = TensorDataset(x, y)
    with pytest.raises(ValueError, match="n_way=20 is larger"):
        train_protonet(nn.Identity(), ds, n_way=20)
    with pytest.raises(ValueError, match="must be at least epochs"):
        train_protonet(nn.Linear(8, 2), ds, n_way=3, episodes=2, epochs=3)
    with pytest.raises(ValueError, match="epochs=0"):
        train_protonet(nn.Linear(8, 2), ds, n_way=3, epochs=0)


# ---------- evaluate_episodes ----------

class CountingEncoder(nn.Module):
    def __init__(self):
        super().__init__(); self.lin, self.seen = nn.Linear(8, 8), 0
    def forward(self, x):
        self.seen += len(x); return self.lin(x)


def test_evaluate_embeds_once_and_matches_per_episode():
    x, y = blobs(n_classes=10, per_class=20)
    enc = CountingEncoder()
    fast = evaluate_episodes(enc, (x, y), 5, 2, episodes=300, n_query=5, device="cpu", batch_size=64)
    assert enc.seen == len(x)                                 # every item embedded exactly once
    net = ProtoNet(enc).eval()
    with torch.no_grad():
        slow = evaluate_episodes(None, TensorDataset(x, y), 5, 2, episodes=300, n_query=5,
                                 episode_fn=lambda xs, ys, xq: net(torch.cat([xs, xq]), ys))
    torch.testing.assert_close(fast.per_episode, slow.per_episode)
    assert isinstance(fast, EpisodeScore) and fast.episodes == 300
    assert abs(fast.accuracy - fast.per_episode.mean().item()) < 1e-6


def test_evaluate_restores_training_mode_and_accepts_datasets():
    x, y = blobs(n_classes=6, per_class=10)
    enc = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8)).train()
    a = evaluate_episodes(enc, TensorDataset(x, y), 3, 1, episodes=50, n_query=3, device="cpu")
    assert enc.training                                          # put back as it was
    b = evaluate_episodes(enc, (x, y), 3, 1, episodes=50, n_query=3, device="cpu")
    class Items(Dataset):                                        # a plain Dataset without .y
        def __len__(self): return len(y)
        def __getitem__(self, i): return x[i], y[i]
    c = evaluate_episodes(enc, Items(), 3, 1, episodes=50, n_query=3, device="cpu")
    torch.testing.assert_close(a.per_episode, b.per_episode); torch.testing.assert_close(a.per_episode, c.per_episode)


def test_ci_shrinks_with_more_episodes():
    x, y = blobs(n_classes=10, per_class=20, sep=0.7)
    cis = [evaluate_episodes(None, (x, y), 5, 1, episodes=e, n_query=5, seed=2).ci95 for e in (50, 200, 3200)]
    assert cis[0] > cis[1] > cis[2]
    assert cis[2] < cis[0] / 4                                   # ~ 1/sqrt(E): sqrt(64) = 8


def test_ci_matches_formula():
    x, y = blobs(n_classes=10, per_class=20, sep=0.7)
    r = evaluate_episodes(None, (x, y), 5, 1, episodes=400, n_query=5, seed=4)
    acc = r.per_episode.numpy()
    assert abs(r.ci95 - 1.96 * acc.std(ddof=1) / np.sqrt(400)) < 1e-6
    assert abs(r.accuracy - acc.mean()) < 1e-6


def test_scoring_1000_episodes_is_fast():
    "The issue's goal: >= 1000 episodes in <= 5 s once embeddings exist (20-way 1-shot, 64-d, 15 queries)."
    x, y = blobs(n_classes=700, per_class=20, dim=64, sep=1.0)
    emb = embed_dataset(None, (x, y))
    r = evaluate_episodes(None, emb, 20, 1, episodes=1000, n_query=15)
    assert r.score_seconds < 5.0, r.score_seconds
    assert r.episodes_per_s > 200


def test_evaluate_bad_inputs():
    x, y = blobs(n_classes=5, per_class=20)
    with pytest.raises(ValueError, match="too few for a confidence interval"):
        evaluate_episodes(None, (x, y), episodes=1)
    with pytest.raises(ValueError, match="not both"):
        evaluate_episodes(nn.Identity(), (x, y), n_query=5, episode_fn=lambda *a: None)
    with pytest.raises(ValueError, match="n_way=6 is larger"):
        evaluate_episodes(None, (x, y), n_way=6)
    with pytest.raises(ValueError, match="choose one of"):
        evaluate_episodes(None, (x, y), distance="hamming")
    with pytest.raises(TypeError, match="embed_fn must be a callable"):
        evaluate_episodes("conv4", (x, y))
    with pytest.raises(ValueError, match="fewer than k_shot"):
        evaluate_episodes(None, (x, y), n_way=5, k_shot=6, n_query=15)
