"""The dataset: size, balance, variety, the documented splits, no duplicates or leakage."""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from novacron.models import dataset

# A user story: "As a nurse, I want ..." (comma optional).
STORY = re.compile(r"^as (?:an?|the) [^,]+?,? (?:i|we) (?:want|need)", re.IGNORECASE)


def test_bundled_jsonl_is_rebuilt_exactly_from_the_sources(tmp_path: Path) -> None:
    out = tmp_path / "tasks.jsonl"
    dataset.write_jsonl(dataset.build(), out)
    bundled = (dataset.MODELS_DIR / dataset.DATASET_FILE).read_bytes()
    assert out.read_bytes() == bundled, "run: python -m novacron.models.dataset"


def test_size_balance_and_domains() -> None:
    examples = dataset.load()
    assert len(examples) >= 2000
    per_label = Counter(e.label for e in examples)
    assert set(per_label) == set(dataset.LABELS)
    assert max(per_label.values()) <= 1.15 * min(per_label.values())
    domains = Counter(e.domain for e in examples)
    assert len(domains) >= 15
    for label in dataset.LABELS:  # every label is spread over many domains
        assert len({e.domain for e in examples if e.label == label}) >= 15


def test_splits_are_stratified_and_recorded() -> None:
    examples = dataset.load()
    assert {e.split for e in examples} == set(dataset.SPLITS)
    sources = [e for e in examples if e.split != "heldout"]
    val = [e for e in sources if e.split == "validation"]
    assert abs(len(val) / len(sources) - dataset.VALIDATION_FRACTION) < 0.03
    heldout = [e for e in examples if e.split == "heldout"]
    assert len(heldout) >= 400
    for rows in (val, heldout):
        for label in dataset.LABELS:
            share = sum(e.label == label for e in rows) / len(rows)
            assert 0.2 < share < 0.3
    for label in dataset.LABELS:   # every phrasing habit, for every label
        assert {e.style for e in heldout if e.label == label} == set(dataset.STYLES)
    meta = json.loads((dataset.MODELS_DIR / "task_classifier.json").read_text())
    assert meta["split"]["seed"] == dataset.SPLIT_SEED
    assert meta["dataset_sha256"] == dataset.dataset_sha256(), "retrain: the dataset changed"


def test_both_sets_hold_the_phrasing_habits() -> None:
    """User stories and bullet lists occur in training and held-out text alike; a literal
    ``\\n`` in either source file is decoded to a line break, never left in the text."""
    examples = dataset.load()
    assert not [e.text for e in examples if "\\n" in e.text]
    for split_rows in ([e for e in examples if e.split != "heldout"],
                       [e for e in examples if e.split == "heldout"]):
        assert sum(bool(STORY.match(e.text)) for e in split_rows) >= 15
        assert sum("\n- " in e.text for e in split_rows) >= 15
        for label in dataset.LABELS:   # lists for every label, not a giveaway of one
            assert any("\n- " in e.text for e in split_rows if e.label == label)


def _word_sets(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    from scipy import sparse

    sets = [set(re.findall(r"[a-z0-9]+", t.lower())) for t in texts]
    vocab = {w: i for i, w in enumerate(sorted(set().union(*sets)))}
    rows = [i for i, ws in enumerate(sets) for _ in ws]
    cols = [vocab[w] for ws in sets for w in ws]
    m = sparse.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(sets), len(vocab)))
    return (m @ m.T).toarray(), np.array([len(ws) for ws in sets])


def test_no_duplicates_near_duplicates_or_leakage() -> None:
    """No two descriptions share 75 % of their words (Jaccard), across all splits:
    no template near-duplicates, and nothing held out is a rewording of training text."""
    examples = dataset.load()
    texts = [dataset.normalised_key(e.text) for e in examples]
    assert len(set(texts)) == len(texts)
    inter, sizes = _word_sets(texts)
    jaccard = inter / np.maximum(sizes[:, None] + sizes[None, :] - inter, 1)
    np.fill_diagonal(jaccard, 0.0)
    i, j = np.unravel_index(int(jaccard.argmax()), jaccard.shape)
    assert jaccard[i, j] < 0.75, (examples[i].text, examples[j].text)


def test_build_refuses_heldout_text_that_is_in_training(tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(dataset.MODELS_DIR / "data", data)
    line = (data / "simple.txt").read_text().splitlines()[-1]
    domain, _, text = line.partition("|")
    with (data / "heldout" / "simple.txt").open("a") as fh:
        fh.write(f"{domain}|ticket|{text.upper()}\n")
    with pytest.raises(ValueError, match="also in the training sources"):
        dataset.build(data)


def test_lengths_vary_against_scope() -> None:
    """Short descriptions of big work and long descriptions of small work are both there."""
    examples = dataset.load()
    words = {id(e): len(e.text.split()) for e in examples}
    assert sum(e.label == "very-complex" and words[id(e)] <= 8 for e in examples) >= 40
    assert sum(e.label == "simple" and words[id(e)] >= 35 for e in examples) >= 10
    for label in dataset.LABELS:
        lengths = [words[id(e)] for e in examples if e.label == label]
        assert min(lengths) <= 8 and max(lengths) >= 30, label


def test_big_words_appear_in_small_tasks_too() -> None:
    """No keyword giveaways: scope words occur in simple tasks as well."""
    simple = [e.text.lower() for e in dataset.load() if e.label == "simple"]
    for word in ("migration", "distributed", "replication", "shard", "consensus",
                 "multi-region", "key management", "live migration", "fleet", "every"):
        assert any(word in t for t in simple), word
