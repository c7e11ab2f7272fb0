"""Serving the task-complexity classifier with onnxruntime (no scikit-learn).

The bundled ``novacron.models`` package holds the ONNX graph (the calibrated
linear model) and its metadata (word and character vocabularies, IDF,
scope-feature scaling, the abstain threshold and the same weights for
explanations). Features are computed by ``novacron.models.features``, the code
the training used.

When the top probability is below the threshold chosen on validation data
(``meta["abstain"]``), the prediction abstains: ``label`` is None,
``abstained`` is true and ``best_guess`` names the top class; the planner then
plans conservatively.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import numpy as np
import onnxruntime as ort

from novacron.coordinator.classifier.limits import (  # re-exported for callers
    MAX_BATCH,
    MAX_TEXT_CHARS,
    InvalidTask,
    TaskTooLong,
    check_text,
)
from novacron.coordinator.classifier.reasons import explain
from novacron.models.features import SCOPE_FEATURE_NAMES, Featurizer

log = logging.getLogger("novacron.coordinator.classifier")

MODEL_FILE = "task_classifier.onnx"
META_FILE = "task_classifier.json"
META_FORMAT = 2
__all__ = ["MAX_BATCH", "MAX_TEXT_CHARS", "InvalidTask", "Prediction", "TaskClassifier",
           "TaskTooLong", "check_text", "default_classifier"]


@dataclass
class Prediction:
    label: str | None             # None when the classifier abstains
    confidence: float             # the top class's calibrated probability
    probabilities: dict[str, float]
    reasons: list[str] = field(default_factory=list)
    # raw scope-feature values and matched terms, kept for the planner (not serialised)
    scope: tuple[np.ndarray, list[tuple[str, ...]]] | None = field(default=None, repr=False,
                                                                    compare=False)
    abstained: bool = False
    best_guess: str = ""          # the top class, also when abstaining
    abstain_threshold: float = 0.0

    def __post_init__(self) -> None:
        if not self.best_guess:
            self.best_guess = self.label or max(self.probabilities,
                                                key=self.probabilities.__getitem__)

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "abstained": self.abstained,
                "best_guess": self.best_guess,
                "confidence": round(self.confidence, 4),
                "abstain_threshold": self.abstain_threshold,
                "probabilities": {k: round(v, 4) for k, v in self.probabilities.items()},
                "reasons": self.reasons}


class TaskClassifier:
    """Thread-safe: onnxruntime sessions may be run concurrently."""

    def __init__(self, model_bytes: bytes, meta: dict[str, Any]) -> None:
        if meta.get("format") != META_FORMAT:
            raise ValueError(f"unsupported classifier metadata format {meta.get('format')!r}")
        if tuple(meta["scope_features"]) != SCOPE_FEATURE_NAMES:
            raise ValueError("classifier metadata was trained with other scope features; "
                             "retrain with python -m novacron.models.train")
        self.labels: tuple[str, ...] = tuple(meta["labels"])
        self.meta = meta
        self.featurizer = Featurizer(
            vocabulary={g: i for i, g in enumerate(meta["vocabulary"])},
            idf=np.asarray(meta["idf"], dtype=np.float64),
            scope_mean=np.asarray(meta["scope_mean"], dtype=np.float64),
            scope_scale=np.asarray(meta["scope_scale"], dtype=np.float64),
            scope_weight=float(meta["scope_weight"]),
            char_vocabulary={g: i for i, g in enumerate(meta["char_vocabulary"])},
            char_idf=np.asarray(meta["char_idf"], dtype=np.float64),
            char_weight=float(meta["char_weight"]),
        )
        self.abstain_threshold = float(meta["abstain"]["threshold"])
        if not 0.0 <= self.abstain_threshold < 1.0:
            raise ValueError(f"abstain threshold {self.abstain_threshold} is not in [0, 1)")
        coef = np.asarray(meta["coef"], dtype=np.float64)
        if coef.shape != (len(self.labels), self.featurizer.size):
            raise ValueError(f"classifier weights have shape {coef.shape}, expected "
                             f"{(len(self.labels), self.featurizer.size)}")
        # Contribution of a feature to class k, relative to the average class.
        self.relative_coef = coef - coef.mean(axis=0, keepdims=True)
        opts = ort.SessionOptions()
        # One call is a tiny matrix-vector product: threads only add hand-off latency.
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(model_bytes, sess_options=opts,
                                            providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        outputs = [o.name for o in self.session.get_outputs()]
        self.prob_output = "probabilities" if "probabilities" in outputs else outputs[-1]

    @classmethod
    def bundled(cls) -> TaskClassifier:
        pkg = resources.files("novacron.models")
        model = pkg.joinpath(MODEL_FILE).read_bytes()
        meta = json.loads(pkg.joinpath(META_FILE).read_text(encoding="utf-8"))
        log.debug("classifier loaded", extra={"features": len(meta["vocabulary"]),
                                              "dataset": meta["dataset_sha256"][:12]})
        return cls(model, meta)

    def probabilities(self, features: np.ndarray) -> np.ndarray:
        """Calibrated class probabilities for a float32 [N, F] feature matrix."""
        out = self.session.run([self.prob_output], {self.input_name: features})[0]
        return np.asarray(out, dtype=np.float64)

    def classify(self, text: str, *, reasons: int = 5) -> Prediction:
        return self.classify_batch([text], reasons=reasons)[0]

    def classify_batch(self, texts: list[str], *, reasons: int = 5) -> list[Prediction]:
        if not texts:
            raise InvalidTask("no task descriptions given")
        if len(texts) > MAX_BATCH:
            raise InvalidTask(f"too many tasks in one batch ({len(texts)}, at most {MAX_BATCH})")
        for i, t in enumerate(texts):
            check_text(t, f"tasks[{i}].text" if len(texts) > 1 else "text")
        feats = np.zeros((len(texts), self.featurizer.size), dtype=np.float32)
        details = []
        for i, t in enumerate(texts):
            vec, surface, terms, raw = self.featurizer.transform_full(t)
            feats[i] = vec
            details.append((surface, terms, raw))
        probs = self.probabilities(feats)
        out = []
        for i, (surface, terms, raw) in enumerate(details):
            k = int(np.argmax(probs[i]))
            confidence = float(probs[i, k])
            abstained = confidence < self.abstain_threshold
            why = explain(feats[i], self.relative_coef[k], self.featurizer, surface, terms,
                          limit=reasons) if reasons else []
            out.append(Prediction(None if abstained else self.labels[k], confidence,
                                  {lab: float(p) for lab, p in zip(self.labels, probs[i],
                                                                   strict=True)}, why,
                                  (raw, terms), abstained, self.labels[k],
                                  self.abstain_threshold))
        return out


_DEFAULT: TaskClassifier | None = None


def default_classifier() -> TaskClassifier:
    """The bundled model, loaded once per process."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = TaskClassifier.bundled()
    return _DEFAULT
