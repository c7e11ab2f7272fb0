"""Train the task-complexity classifier and export it to ONNX.

    python -m novacron.models.train          # search hyper-parameters, train, export
    python -m novacron.models.train --fast   # reuse the recorded hyper-parameters

Pipeline: ``novacron.models.features.Featurizer`` (word TF-IDF + character
TF-IDF + scope features) -> multinomial logistic regression (scikit-learn).
Calibration is temperature scaling: the temperature minimising log-loss on
out-of-fold logits of the training split (5 folds) divides the weights, so the
exported model emits calibrated probabilities directly. The abstain threshold
is then chosen on the validation split (see ``choose_abstain_threshold``).
``--fast`` also reuses the recorded temperature and threshold, so it is a
single fit. Outputs in ``models/``:

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
from novacron.models.features import (
    SCOPE_FEATURE_NAMES,
    Featurizer,
    char_ngrams,
    fit_vocabulary,
    scope_features,
)

MODEL_FILE = "task_classifier.onnx"
META_FILE = "task_classifier.json"
META_FORMAT = 2
SEED = 7
FOLDS = 5
SEARCH_FOLDS = 3
MIN_DF = 2
CHAR_MIN_DF = 3
C_GRID = (10.0, 30.0)
SCOPE_WEIGHT_GRID = (0.03, 0.1)
CHAR_WEIGHT_GRID = (1.5,)
# lbfgs stopping tolerance: tight enough that a retrain lands on the same weights
# (see tests/classifier/test_model.py), loose enough for a fit in seconds.
TOL = 1e-6
ECE_BINS = 10
# Abstain: the lowest top-probability threshold at which the validation rows the
# model keeps are at least this accurate, abstaining on at most MAX_ABSTAIN of them.
ABSTAIN_TARGET_ACCURACY = 0.95
ABSTAIN_MAX_RATE = 0.15
ABSTAIN_GRID = tuple(round(0.30 + 0.01 * i, 2) for i in range(51))   # 0.30 .. 0.80


@dataclass
class Trained:
    featurizer: Featurizer
    model: Any            # sklearn LogisticRegression with temperature-scaled weights
    temperature: float
    hyper: dict[str, float]
    cv_accuracy: float | None        # None when the calibration was reused (--fast)
    abstain: dict[str, float]


def _matrix(fz: Featurizer, texts: list[str]) -> Any:
    """Sparse: the solver is much faster on CSR than on the mostly-zero dense array."""
    from scipy import sparse

    return sparse.csr_matrix(fz.transform(texts))


def _make_featurizer(texts: list[str], hyper: dict[str, float]) -> Featurizer:
    vocab, idf = fit_vocabulary(texts, MIN_DF)
    char_vocab, char_idf = fit_vocabulary(texts, CHAR_MIN_DF, char_ngrams)
    raw = np.array([scope_features(t)[0] for t in texts])
    mean = raw.mean(axis=0)
    scale = raw.std(axis=0)
    scale[scale < 1e-9] = 1.0
    return Featurizer(vocab, idf, mean, scale, float(hyper["scope_weight"]),
                      char_vocab, char_idf, float(hyper["char_weight"]))


def _logreg(c: float) -> Any:
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=c, max_iter=5000, tol=TOL, random_state=SEED)


def _oof_logits(texts: list[str], y: np.ndarray, hyper: dict[str, float],
                folds: int = FOLDS) -> np.ndarray:
    """Out-of-fold decision values: every training row scored by a model that never saw it."""
    from sklearn.model_selection import StratifiedKFold

    out = np.zeros((len(texts), len(dataset.LABELS)))
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=SEED)
    for fit_idx, val_idx in splitter.split(np.zeros(len(y)), y):
        fz = _make_featurizer([texts[i] for i in fit_idx], hyper)
        model = _logreg(hyper["C"]).fit(_matrix(fz, [texts[i] for i in fit_idx]), y[fit_idx])
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
    """Grid search by cross-validation on the training split only (never the held-out set)."""
    best: tuple[float, float, dict[str, float]] | None = None
    for cw in CHAR_WEIGHT_GRID:
        for sw in SCOPE_WEIGHT_GRID:
            for c in C_GRID:
                hyper = {"C": c, "scope_weight": sw, "char_weight": cw}
                logits = _oof_logits(texts, y, hyper, SEARCH_FOLDS)
                acc = float((logits.argmax(axis=1) == y).mean())
                nll = _nll(logits, y, fit_temperature(logits, y))
                if log:
                    print(f"  C={c:<5} scope_weight={sw:<5} char_weight={cw:<4} "
                          f"cv accuracy {acc:.3f}  cv nll {nll:.3f}", flush=True)
                key = (acc, -nll)
                if best is None or key > (best[0], best[1]):
                    best = (acc, -nll, hyper)
    assert best is not None
    return best[2]


def choose_abstain_threshold(probs: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """The lowest threshold whose kept rows reach ABSTAIN_TARGET_ACCURACY, within
    ABSTAIN_MAX_RATE abstentions; if none does, the threshold at that rate."""
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y
    chosen = None
    for t in ABSTAIN_GRID:
        kept = conf >= t
        rate = 1.0 - float(kept.mean())
        if rate > ABSTAIN_MAX_RATE:
            break
        chosen = t
        if kept.any() and float(correct[kept].mean()) >= ABSTAIN_TARGET_ACCURACY:
            break
    threshold = ABSTAIN_GRID[0] if chosen is None else chosen
    kept = conf >= threshold
    return {"threshold": threshold,
            "target_accuracy": ABSTAIN_TARGET_ACCURACY, "max_rate": ABSTAIN_MAX_RATE,
            "validation_abstain_rate": 1.0 - float(kept.mean()),
            "validation_kept_accuracy": float(correct[kept].mean()) if kept.any() else 0.0}


def train(examples: list[dataset.Example], hyper: dict[str, float],
          calibration: dict[str, Any] | None = None) -> Trained:
    """Fit on the training split. ``calibration`` ({"temperature", "abstain"}) skips the
    out-of-fold temperature fit and the threshold choice and reuses the given ones."""
    texts, y = _split(examples, "train")
    hyper = {k: float(hyper[k]) for k in ("C", "scope_weight", "char_weight")}
    cv_accuracy: float | None = None
    if calibration is None:
        oof = _oof_logits(texts, y, hyper)
        temperature = fit_temperature(oof, y)
        cv_accuracy = float((oof.argmax(axis=1) == y).mean())
    else:
        temperature = float(calibration["temperature"])
    featurizer = _make_featurizer(texts, hyper)
    model = _logreg(hyper["C"]).fit(_matrix(featurizer, texts), y)
    # Fold the temperature into the weights: the exported graph is then calibrated.
    model.coef_ = model.coef_ / temperature
    model.intercept_ = model.intercept_ / temperature
    if calibration is None:
        val_texts, y_val = _split(examples, "validation")
        abstain = choose_abstain_threshold(
            model.predict_proba(_matrix(featurizer, val_texts)), y_val)
    else:
        abstain = dict(calibration["abstain"])
    return Trained(featurizer, model, temperature, hyper, cv_accuracy, abstain)


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


def _ordered(vocab: dict[str, int]) -> list[str]:
    out = [""] * len(vocab)
    for gram, idx in vocab.items():
        out[idx] = gram
    return out


def split_metrics(trained: Trained, examples: list[dataset.Example], split: str
                  ) -> dict[str, Any]:
    texts, y = _split(examples, split)
    x = _matrix(trained.featurizer, texts)
    probs = trained.model.predict_proba(x)
    raw_logits = trained.model.decision_function(x) * trained.temperature
    pred = probs.argmax(axis=1)
    kept = probs.max(axis=1) >= trained.abstain["threshold"]
    return {
        "size": len(texts),
        "accuracy": float((pred == y).mean()),
        "macro_f1": macro_f1(y, pred),
        "recall": {lab: float((pred[y == k] == k).mean())
                   for k, lab in enumerate(dataset.LABELS)},
        "confusion": confusion(y, pred),
        "ece_uncalibrated": expected_calibration_error(softmax(raw_logits), y),
        "ece_calibrated": expected_calibration_error(probs, y),
        "abstain_rate": 1.0 - float(kept.mean()),
        "kept_accuracy": float((pred[kept] == y[kept]).mean()) if kept.any() else 0.0,
    }


def metadata(trained: Trained, examples: list[dataset.Example]) -> dict[str, Any]:
    fz = trained.featurizer
    return {
        "format": META_FORMAT,
        "labels": list(dataset.LABELS),
        "dataset_sha256": dataset.dataset_sha256(),
        "split": {"seed": dataset.SPLIT_SEED,
                  "validation_fraction": dataset.VALIDATION_FRACTION,
                  "stratified_by": ["label", "domain"],
                  "heldout": "models/data/heldout (written separately)"},
        "hyperparameters": {**trained.hyper, "min_df": MIN_DF, "char_min_df": CHAR_MIN_DF,
                            "folds": FOLDS, "seed": SEED, "tol": TOL},
        "temperature": trained.temperature,
        "abstain": trained.abstain,
        "vocabulary": _ordered(fz.vocabulary),
        "idf": fz.idf.tolist(),
        "char_vocabulary": _ordered(fz.char_vocabulary),
        "char_idf": fz.char_idf.tolist(),
        "char_weight": fz.char_weight,
        "scope_features": list(SCOPE_FEATURE_NAMES),
        "scope_mean": fz.scope_mean.tolist(),
        "scope_scale": fz.scope_scale.tolist(),
        "scope_weight": fz.scope_weight,
        # Calibrated weights, kept here to explain decisions; the graph holds the same.
        "coef": np.round(trained.model.coef_, 7).tolist(),
        "intercept": np.round(trained.model.intercept_, 7).tolist(),
        "metrics": {
            "cv_accuracy": trained.cv_accuracy,
            "n_train": int(sum(e.split == "train" for e in examples)),
            "validation": split_metrics(trained, examples, "validation"),
            "heldout": split_metrics(trained, examples, "heldout"),
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m novacron.models.train",
                                     description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--fast", action="store_true",
                        help="reuse the hyper-parameters, temperature and abstain threshold "
                             "recorded in the current metadata (one fit)")
    parser.add_argument("--reuse-hyper", action="store_true",
                        help="reuse the recorded hyper-parameters but fit the temperature and "
                             "the abstain threshold again (after the data changed)")
    parser.add_argument("--out", type=Path, default=dataset.MODELS_DIR,
                        help="output folder (default: the models package)")
    args = parser.parse_args(argv)
    examples = dataset.load()
    calibration = None
    if args.fast:
        recorded = json.loads((dataset.MODELS_DIR / META_FILE).read_text())
        hyper = recorded["hyperparameters"]
        calibration = {"temperature": recorded["temperature"], "abstain": recorded["abstain"]}
    elif args.reuse_hyper:
        hyper = json.loads((dataset.MODELS_DIR / META_FILE).read_text())["hyperparameters"]
    else:
        print(f"hyper-parameter search ({SEARCH_FOLDS}-fold CV on the training split):")
        hyper = search(*_split(examples, "train"))
    trained = train(examples, hyper, calibration)
    meta = metadata(trained, examples)
    if args.fast:   # keep the recorded out-of-fold figure the calibration came from
        meta["metrics"]["cv_accuracy"] = recorded["metrics"]["cv_accuracy"]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / MODEL_FILE).write_bytes(to_onnx(trained))
    (args.out / META_FILE).write_text(json.dumps(meta, separators=(",", ":")) + "\n")
    m = meta["metrics"]
    print(f"chosen {trained.hyper}, temperature {trained.temperature:.3f}, "
          f"abstain below {trained.abstain['threshold']:.2f}")
    print(f"cv accuracy {m['cv_accuracy']:.3f}")
    for split in ("validation", "heldout"):
        s = m[split]
        print(f"{split}: accuracy {s['accuracy']:.3f}, macro-F1 {s['macro_f1']:.3f}, ECE "
              f"{s['ece_uncalibrated']:.3f} -> {s['ece_calibrated']:.3f} calibrated, abstain "
              f"{s['abstain_rate']:.3f}, kept accuracy {s['kept_accuracy']:.3f}")
        for label, row in zip(dataset.LABELS, s["confusion"], strict=True):
            print(f"  {label:13} {row}  recall {s['recall'][label]:.3f}")
    print(f"wrote {args.out / MODEL_FILE} and {args.out / META_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
