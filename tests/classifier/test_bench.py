"""``novacron bench classifier``: its figures and its references."""

from __future__ import annotations

import argparse

from novacron.bench import classifier


def test_report_has_quality_latency_and_references() -> None:
    report = classifier.run(argparse.Namespace(rounds=1, json=True))
    d = report.data
    assert d["accuracy"] >= 0.85 and d["macro_f1"] >= 0.85
    assert d["validation"]["accuracy"] >= 0.9
    assert sum(map(sum, d["confusion"]["matrix"])) == d["test_size"] >= 400
    assert set(d["recall"]) == set(d["confusion"]["labels"])
    for k, lab in enumerate(d["confusion"]["labels"]):
        row = d["confusion"]["matrix"][k]
        assert d["recall"][lab] == row[k] / sum(row)
    assert 0 < d["abstain"]["rate"] < 0.3
    assert d["abstain"]["kept_accuracy"] > d["accuracy"]
    assert 0 <= d["ece"] < 0.1
    assert sum(s["size"] for s in d["per_style"].values()) == d["test_size"]
    assert d["tricky"]["total"] == len(classifier.TRICKY)
    assert set(d["targets"]) == {"accuracy_ge_0.90", "every_recall_ge_0.85", "p99_lt_10ms"}
    assert d["latency_ms"]["calls"] == d["test_size"]
    assert 0 < d["latency_ms"]["p50"] <= d["latency_ms"]["p99"]
    assert 0 < d["cpu_time_ms"]["p50"] <= d["cpu_time_ms"]["p99"]
    ref = d["reference"]
    assert ref["keyword_rules"]["accuracy"] < d["accuracy"]
    assert ref["bare_onnx_latency_ms"]["p50"] > 0
    assert d["ratios"]["accuracy_vs_keyword_rules"] > 1.0


def test_keyword_baseline_is_a_real_rule_set() -> None:
    assert classifier.keyword_baseline("Fix the typo in the README") == "simple"
    assert classifier.keyword_baseline("Integrate Stripe") == "complex"
    assert classifier.keyword_baseline("Shard the users table") == "very-complex"
    assert classifier.keyword_baseline("Add a dark mode toggle") == "medium"
