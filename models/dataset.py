"""The labelled task descriptions: sources, split and the bundled JSONL.

Sources are hand-written, one file per label under ``models/data/`` (lines
``domain|text``). ``python -m novacron.models.dataset`` rebuilds
``models/tasks.jsonl`` from them with a reproducible split: within every
(label, domain) group, shuffled with ``SPLIT_SEED``, ``TEST_FRACTION`` of the
rows (rounded, at least one when the group has 3+) go to ``test``.
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

LABELS: tuple[str, ...] = ("simple", "medium", "complex", "very-complex")
DOMAINS: tuple[str, ...] = (
    "web", "mobile", "backend", "infra", "devops", "data", "ml", "security", "networking", "docs",
    "qa", "virtualization",
)
SOURCE_FILES = {
    "simple": "simple.txt", "medium": "medium.txt", "complex": "complex.txt",
    "very-complex": "very_complex.txt",
}
SPLIT_SEED = 20261124
TEST_FRACTION = 0.2
DATASET_FILE = "tasks.jsonl"
MODELS_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Example:
    text: str
    label: str
    domain: str
    split: str


def read_sources(data_dir: Path = MODELS_DIR / "data") -> list[tuple[str, str, str]]:
    """(text, label, domain) from the hand-written source files, in file order."""
    rows: list[tuple[str, str, str]] = []
    seen: set[str] = set()
    for label, name in SOURCE_FILES.items():
        path = data_dir / name
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip() or line.startswith("#"):
                continue
            domain, sep, text = line.partition("|")
            if not sep or domain not in DOMAINS or not text.strip():
                raise ValueError(f"{path}:{lineno}: expected 'domain|text' with a known domain")
            key = " ".join(text.lower().split())
            if key in seen:
                raise ValueError(f"{path}:{lineno}: duplicate description")
            seen.add(key)
            rows.append((text.strip(), label, domain))
    return rows


def split_rows(rows: list[tuple[str, str, str]]) -> list[Example]:
    """Stratified by (label, domain), deterministic for a given SPLIT_SEED."""
    groups: dict[tuple[str, str], list[int]] = {}
    for i, (_, label, domain) in enumerate(rows):
        groups.setdefault((label, domain), []).append(i)
    rng = random.Random(SPLIT_SEED)
    test: set[int] = set()
    for key in sorted(groups):
        idx = groups[key][:]
        rng.shuffle(idx)
        n_test = round(len(idx) * TEST_FRACTION)
        if len(idx) >= 3:
            n_test = max(n_test, 1)
        test.update(idx[:n_test])
    return [Example(t, lab, dom, "test" if i in test else "train")
            for i, (t, lab, dom) in enumerate(rows)]


def write_jsonl(examples: list[Example], path: Path) -> None:
    with path.open("w", encoding="utf-8") as fh:
        for ex in examples:
            fh.write(json.dumps({"text": ex.text, "label": ex.label, "domain": ex.domain,
                                 "split": ex.split}, ensure_ascii=False) + "\n")


def load() -> list[Example]:
    """The bundled dataset (works from an installed package too)."""
    text = resources.files("novacron.models").joinpath(DATASET_FILE).read_text(encoding="utf-8")
    out = []
    for line in text.splitlines():
        if line.strip():
            doc = json.loads(line)
            out.append(Example(doc["text"], doc["label"], doc["domain"], doc["split"]))
    return out


def dataset_sha256() -> str:
    data = resources.files("novacron.models").joinpath(DATASET_FILE).read_bytes()
    return hashlib.sha256(data).hexdigest()


def main() -> int:
    examples = split_rows(read_sources())
    write_jsonl(examples, MODELS_DIR / DATASET_FILE)
    counts: dict[tuple[str, str], int] = {}
    for ex in examples:
        counts[(ex.label, ex.split)] = counts.get((ex.label, ex.split), 0) + 1
    for label in LABELS:
        print(f"{label:13} train {counts.get((label, 'train'), 0):4}  "
              f"test {counts.get((label, 'test'), 0):4}")
    print(f"wrote {len(examples)} examples to {MODELS_DIR / DATASET_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
