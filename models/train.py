"""Train the task-complexity classifier and export it to ONNX.

    python -m novacron.models.train          # search hyper-parameters, train, export
    python -m novacron.models.train --fast   # reuse the recorded hyper-parameters

Pipeline: ``novacron.models.features.Featurizer`` (word TF-IDF + scope
features) -> multinomial logistic regression (scikit-learn). Calibration is
temperature scaling: the temperature minimising log-loss on out-of-fold logits
of the training split (5 folds) divides the weights, so the exported model
emits calibrated probabilities directly. Outputs in ``models/``:

* ``task_classifier.onnx`` - the linear model (input ``features`` float[N, F],
  outputs ``label`` and ``probabilities`` float[N, 4]);
* ``task_classifier.json`` - what the graph needs from outside: vocabulary,
  IDF, scope-feature scaling, the weights again (for reasons), the metrics.

scikit-learn, skl2onnx and onnx come from the ``train`` extra; the coordinator
never imports this module.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from novacron.models import dataset
from novacron.models.features import SCOPE_FEATURE_NAMES, Featurizer, fit_vocabulary, scope_features

MODEL_FILE = "task_classifier.onnx"
META_FILE = "task_classifier.json"
SEED = 7
FOLDS = 5
MIN_DF = 2
C_GRID = (0.3, 1.0, 3.0, 10.0, 30.0)
SCOPE_WEIGHT_GRID = (0.15, 0.25, 0.5)
ECE_BINS = 10


@dataclass
class Trained:
    featurizer: Featurizer
    model: Any            # sklearn LogisticRegression with temperature-scaled weights
    temperature: float
    hyper: dict[str, float]
    cv_accuracy: float


def _matrix(fz: Featurizer, texts: list[str]) -> Any:
    """Sparse: the solver is ~10x faster on CSR than on the mostly-zero dense array."""
    from scipy import sparse

    return sparse.csr_matrix(fz.transform(texts))


def _make_featurizer(texts: list[str], scope_weight: float) -> Featurizer:
    vocab, idf = fit_vocabulary(texts, MIN_DF)
    raw = np.array([scope_features(t)[0] for t in texts])
    mean = raw.mean(axis=0)
    scale = raw.std(axis=0)
    scale[scale < 1e-9] = 1.0
    return Featurizer(vocab, idf, mean, scale, scope_weight)


def _logreg(c: float) -> Any:
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=c, max_iter=5000, tol=1e-8, random_state=SEED)


def _oof_logits(texts: list[str], y: np.ndarray, c: float, scope_weight: float) -> np.ndarray:
    """Out-of-fold decision values: every training row scored by a model that never saw it."""
    from sklearn.model_selection import StratifiedKFold

    out = np.zeros((len(texts), len(dataset.LABELS)))
    folds = StratifiedKFold(n_splits=FOLDS, shuffle=True, random_state=SEED)
    for fit_idx, val_idx in folds.split(np.zeros(len(y)), y):
        fz = _make_featurizer([texts[i] for i in fit_idx], scope_weight)
        model = _logreg(c).fit(_matrix(fz, [texts[i] for i in fit_idx]), y[fit_idx])
        out[val_idx] = model.decision_function(_matrix(fz, [texts[i] for i in val_idx]))
    return out


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return np.asarray(e / e.sum(axis=1, keepdims=True))


def _nll(logits: np.ndarray, y: np.ndarray, t: float) -> float:
    p = softmax(logits / t)
    return float(-np.mean(np.log(np.clip(p[np.arange(len(y)), y], 1e-12, None))))


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """Golden-section search for T in [0.05, 20] on a log scale (NLL is unimodal in log T)."""
    lo, hi = np.log(0.05), np.log(20.0)
    g = (np.sqrt(5) - 1) / 2
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    for _ in range(80):
        if _nll(logits, y, float(np.exp(a))) < _nll(logits, y, float(np.exp(b))):
            hi = b
        else:
            lo = a
        a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    return float(np.exp((lo + hi) / 2))


def expected_calibration_error(probs: np.ndarray, y: np.ndarray, bins: int = ECE_BINS) -> float:
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    ece = 0.0
    for lo, hi in itertools.pairwise(edges):
        mask = (conf > lo) & (conf <= hi)
        if mask.any():
            ece += mask.mean() * abs(conf[mask].mean() - correct[mask].mean())
    return float(ece)


def _split(examples: list[dataset.Example], split: str) -> tuple[list[str], np.ndarray]:
    rows = [e for e in examples if e.split == split]
    return [e.text for e in rows], np.array([dataset.LABELS.index(e.label) for e in rows])


def search(texts: list[str], y: np.ndarray, log: bool = True) -> dict[str, float]:
    best: tuple[float, float, dict[str, float]] | None = None
    for sw in SCOPE_WEIGHT_GRID:
        for c in C_GRID:
            logits = _oof_logits(texts, y, c, sw)
            acc = float((logits.argmax(axis=1) == y).mean())
            nll = _nll(logits, y, fit_temperature(logits, y))
            if log:
                print(f"  C={c:<5} scope_weight={sw:<5} cv accuracy {acc:.3f}  cv nll {nll:.3f}")
            key = (acc, -nll)
            if best is None or key > (best[0], best[1]):
                best = (acc, -nll, {"C": c, "scope_weight": sw})
    assert best is not None
    return best[2]


def train(examples: list[dataset.Example], hyper: dict[str, float]) -> Trained:
    texts, y = _split(examples, "train")
    c, sw = float(hyper["C"]), float(hyper["scope_weight"])
    oof = _oof_logits(texts, y, c, sw)
    temperature = fit_temperature(oof, y)
    featurizer = _make_featurizer(texts, sw)
    model = _logreg(c).fit(_matrix(featurizer, texts), y)
    # Fold the temperature into the weights: the exported graph is then calibrated.
    model.coef_ = model.coef_ / temperature
    model.intercept_ = model.intercept_ / temperature
    return Trained(featurizer, model, temperature, {"C": c, "scope_weight": sw},
                   float((oof.argmax(axis=1) == y).mean()))


def to_onnx(trained: Trained) -> bytes:
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType

    onx = convert_sklearn(
        trained.model,
        initial_types=[("features", FloatTensorType([None, trained.featurizer.size]))],
        options={id(trained.model): {"zipmap": False}},
        target_opset={"": 17, "ai.onnx.ml": 3},
    )
    onx.doc_string = "NovaCron task-complexity classifier (calibrated logistic regression)"
    return bytes(onx.SerializeToString())


def confusion(y: np.ndarray, pred: np.ndarray) -> list[list[int]]:
    n = len(dataset.LABELS)
    m = np.zeros((n, n), dtype=int)
    for t, p in zip(y, pred, strict=True):
        m[t, p] += 1
    return [[int(v) for v in row] for row in m]


def macro_f1(y: np.ndarray, pred: np.ndarray) -> float:
    scores = []
    for k in range(len(dataset.LABELS)):
        tp = int(((pred == k) & (y == k)).sum())
        fp = int(((pred == k) & (y != k)).sum())
        fn = int(((pred != k) & (y == k)).sum())
        scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores))


def metadata(trained: Trained, examples: list[dataset.Example]) -> dict[str, Any]:
    fz = trained.featurizer
    test_texts, y_test = _split(examples, "test")
    probs = trained.model.predict_proba(fz.transform(test_texts))
    raw_logits = trained.model.decision_function(fz.transform(test_texts)) * trained.temperature
    pred = probs.argmax(axis=1)
    vocab_list = [""] * fz.n_terms
    for gram, idx in fz.vocabulary.items():
        vocab_list[idx] = gram
    return {
        "format": 1,
        "labels": list(dataset.LABELS),
        "dataset_sha256": dataset.dataset_sha256(),
        "split": {"seed": dataset.SPLIT_SEED, "test_fraction": dataset.TEST_FRACTION,
                  "stratified_by": ["label", "domain"]},
        "hyperparameters": {**trained.hyper, "min_df": MIN_DF, "folds": FOLDS, "seed": SEED},
        "temperature": trained.temperature,
        "vocabulary": vocab_list,
        "idf": fz.idf.tolist(),
        "scope_features": list(SCOPE_FEATURE_NAMES),
        "scope_mean": fz.scope_mean.tolist(),
        "scope_scale": fz.scope_scale.tolist(),
        "scope_weight": fz.scope_weight,
        # Calibrated weights, kept here to explain decisions; the graph holds the same.
        "coef": np.round(trained.model.coef_, 7).tolist(),
        "intercept": np.round(trained.model.intercept_, 7).tolist(),
        "metrics": {
            "cv_accuracy": trained.cv_accuracy,
            "test_accuracy": float((pred == y_test).mean()),
            "test_macro_f1": macro_f1(y_test, pred),
            "test_confusion": confusion(y_test, pred),
            "test_ece_uncalibrated": expected_calibration_error(softmax(raw_logits), y_test),
            "test_ece_calibrated": expected_calibration_error(probs, y_test),
            "n_train": int(sum(e.split == "train" for e in examples)),
            "n_test": len(test_texts),
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m novacron.models.train",
                                     description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--fast", action="store_true",
                        help="reuse the hyper-parameters recorded in the current metadata")
    parser.add_argument("--out", type=Path, default=dataset.MODELS_DIR,
                        help="output folder (default: the models package)")
    args = parser.parse_args(argv)
    examples = dataset.load()
    if args.fast:
        recorded = json.loads((dataset.MODELS_DIR / META_FILE).read_text())["hyperparameters"]
        hyper = {"C": recorded["C"], "scope_weight": recorded["scope_weight"]}
    else:
        print("hyper-parameter search (5-fold CV on the training split):")
        hyper = search(*_split(examples, "train"))
    trained = train(examples, hyper)
    meta = metadata(trained, examples)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / MODEL_FILE).write_bytes(to_onnx(trained))
    (args.out / META_FILE).write_text(json.dumps(meta, separators=(",", ":")) + "\n")
    m = meta["metrics"]
    print(f"chosen {hyper}, temperature {trained.temperature:.3f}")
    print(f"cv accuracy {m['cv_accuracy']:.3f}; test accuracy {m['test_accuracy']:.3f}, "
          f"macro-F1 {m['test_macro_f1']:.3f}, ECE {m['test_ece_uncalibrated']:.3f} -> "
          f"{m['test_ece_calibrated']:.3f} calibrated")
    for label, row in zip(dataset.LABELS, m["test_confusion"], strict=True):
        print(f"  {label:13} {row}")
    print(f"wrote {args.out / MODEL_FILE} and {args.out / META_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
