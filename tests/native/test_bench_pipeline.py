"""`novacron bench pipeline` runs end to end on small images and reports every figure."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from novacron.bench import pipeline


@pytest.mark.slow
def test_bench_pipeline_json_has_all_figures(script_env: dict[str, str]) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "novacron.cli.main", "bench", "pipeline", "--size", "4M",
         "--repeat", "1", "--json"],
        capture_output=True, text=True, timeout=300, env=script_env, check=True)
    doc = json.loads(out.stdout)
    assert doc["bench"] == "pipeline"
    assert set(doc["images"]) == {"mostly-zero", "realistic", "random"}
    for r in doc["images"].values():
        for key in ("memcpy_gbps", "scan_2t_gbps", "encode_1t_gbps", "encode_2t_gbps",
                    "decode_1t_gbps", "decode_2t_gbps", "python_encode_gbps",
                    "python_decode_gbps"):
            assert r[key] > 0, key
    assert doc["images"]["random"]["wire_ratio"] >= 1.0  # incompressible: stored, plus framing
    assert doc["images"]["mostly-zero"]["wire_ratio"] < 0.2
    assert 0 < doc["images"]["realistic"]["wire_ratio"] < 0.8
    assert doc["images"]["realistic"]["pages_dedup"] > 0
    mem = doc["images"]["realistic"]["memory"]
    assert 0 < mem["structures"] <= mem["budget"]
    assert {t["target"].split(":")[0] for t in doc["targets"]} >= {"realistic", "random"}


def test_bench_rejects_bad_arguments() -> None:
    import argparse

    with pytest.raises(argparse.ArgumentTypeError):
        pipeline.parse_size("lots")
    with pytest.raises(argparse.ArgumentTypeError):
        pipeline.parse_size("4K")
    assert pipeline.parse_size("1G") == 1 << 30
    assert pipeline.parse_size("256MiB") == 256 << 20


@pytest.mark.parametrize(("overrides", "needle"), [
    ({"images": "random,huge"}, "unknown image kind"),
    ({"images": " , "}, "unknown image kind"),
    ({"repeat": 0}, "--repeat"),
    ({"level": 23}, "--level"),
])
def test_bench_refuses_bad_options_before_measuring(overrides: dict[str, object],
                                                    needle: str) -> None:
    import argparse

    args = argparse.Namespace(size=64 * 4096, images="random", repeat=1, level=1, json=True)
    for k, v in overrides.items():
        setattr(args, k, v)
    with pytest.raises(SystemExit, match=needle):
        pipeline.run(args)
