"""Reasons a person can read: the features that pushed the decision, in words.

For the predicted class k, feature i contributed ``x_i * (w_ki - mean_j w_ji)``
to the logit of k relative to the average class; the largest positive
contributions are the reasons. Scope features read as phrases with what they
matched ("spans several components (API, database, queue)"); word TF-IDF
features as the n-gram and its weight ("TF-IDF: 'payment provider' +0.80");
character n-grams summed per word they came from ("word form: 'repos' +0.31").
"""

from __future__ import annotations

import numpy as np

from novacron.models.features import SCOPE_FEATURES, Featurizer

# How a scope feature reads when its value is *below* the training average
# (its absence pushed the decision). Default: "no sign that it <reason>".
LOW_PHRASES: dict[str, str] = {
    "component_kinds": "touches few kinds of component ({terms})",
    "component_mentions": "mentions few components",
    "log_word_count": "is a short description ({terms})",
    "short_description": "is not a short description ({terms})",
    "long_description": "is not a long description ({terms})",
    "comma_count": "has no list of parts",
    "and_count": "does not join several parts",
    "listed_parts": "enumerates few parts of work",
    "sentences": "is a single sentence",
    "numbers": "quotes no numbers",
    "list_items": "is not a bullet list",
    "create_minus_edit": "edits more than it creates ({terms})",
}
MIN_CONTRIBUTION = 0.02


def _phrase(template: str, value: float, terms: tuple[str, ...]) -> str:
    shown = ", ".join(terms[:4]) + (", ..." if len(terms) > 4 else "")
    if not shown:
        template = template.replace(" ({terms})", "")
    return template.format(value=value, terms=shown)


def scope_phrase(index: int, scaled: float, raw: float, terms: tuple[str, ...]) -> str:
    feat = SCOPE_FEATURES[index]
    if scaled >= 0:
        return _phrase(feat.reason, raw, terms)
    low = LOW_PHRASES.get(feat.name)
    if low is None:
        return "no sign that it " + _phrase(feat.reason, raw, ())
    return _phrase(low, raw, terms)


def explain(x: np.ndarray, relative_coef: np.ndarray, featurizer: Featurizer,
            surface: dict[int, str], terms: list[tuple[str, ...]], *, limit: int = 5) -> list[str]:
    contrib = x.astype(np.float64) * relative_coef
    n_terms = featurizer.n_terms
    candidates: list[tuple[float, str]] = []
    per_word: dict[str, float] = {}
    for idx, shown in surface.items():
        c = float(contrib[idx])
        if idx >= n_terms:
            per_word[shown] = per_word.get(shown, 0.0) + c
        elif c > MIN_CONTRIBUTION:
            candidates.append((c, f"TF-IDF: '{shown}' +{c:.2f}"))
    candidates.extend((c, f"word form: '{word}' +{c:.2f}") for word, c in per_word.items()
                      if c > MIN_CONTRIBUTION)
    off = featurizer.scope_offset
    scope = contrib[off:]
    scaled = x[off:].astype(np.float64)
    raw = scaled / featurizer.scope_weight * featurizer.scope_scale + featurizer.scope_mean
    for i in np.argsort(-scope)[: limit * 2]:
        c = float(scope[i])
        if c > MIN_CONTRIBUTION:
            phrase = scope_phrase(int(i), float(scaled[i]), float(raw[i]), terms[i])
            candidates.append((c, f"{phrase} +{c:.2f}"))
    candidates.sort(key=lambda item: -item[0])
    return [text for _, text in candidates[:limit]]
