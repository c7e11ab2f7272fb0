"""The dataset: size, balance, variety, the documented split, and no drift from its sources."""

from __future__ import annotations

import json
from collections import Counter

from novacron.models import dataset


def test_bundled_jsonl_is_rebuilt_exactly_from_the_sources(tmp_path) -> None:
    out = tmp_path / "tasks.jsonl"
    dataset.write_jsonl(dataset.split_rows(dataset.read_sources()), out)
    bundled = (dataset.MODELS_DIR / dataset.DATASET_FILE).read_bytes()
    assert out.read_bytes() == bundled, "run: python -m novacron.models.dataset"


def test_size_balance_and_domains() -> None:
    examples = dataset.load()
    assert len(examples) >= 600
    per_label = Counter(e.label for e in examples)
    assert set(per_label) == set(dataset.LABELS)
    assert max(per_label.values()) <= 1.1 * min(per_label.values())
    domains = Counter(e.domain for e in examples)
    assert len(domains) >= 10
    for label in dataset.LABELS:  # every label is spread over many domains
        assert len({e.domain for e in examples if e.label == label}) >= 10


def test_split_is_stratified_and_recorded() -> None:
    examples = dataset.load()
    test = [e for e in examples if e.split == "test"]
    assert {e.split for e in examples} == {"train", "test"}
    assert abs(len(test) / len(examples) - dataset.TEST_FRACTION) < 0.03
    for label in dataset.LABELS:
        share = sum(e.label == label for e in test) / len(test)
        assert 0.2 < share < 0.3
    meta = json.loads((dataset.MODELS_DIR / "task_classifier.json").read_text())
    assert meta["split"]["seed"] == dataset.SPLIT_SEED
    assert meta["dataset_sha256"] == dataset.dataset_sha256(), "retrain: the dataset changed"


def test_no_duplicates_and_varied_lengths() -> None:
    examples = dataset.load()
    texts = [" ".join(e.text.lower().split()) for e in examples]
    assert len(set(texts)) == len(texts)
    for label in dataset.LABELS:
        lengths = [len(e.text.split()) for e in examples if e.label == label]
        assert min(lengths) <= 8 and max(lengths) >= 20, label


def test_big_words_appear_in_small_tasks_too() -> None:
    """No keyword giveaways: scope words occur in simple tasks as well."""
    simple = [e.text.lower() for e in dataset.load() if e.label == "simple"]
    for word in ("migration", "distributed", "replication", "shard", "consensus",
                 "multi-region", "key management", "live migration"):
        assert any(word in t for t in simple), word
