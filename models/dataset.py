"""The labelled task descriptions: sources, splits and the bundled JSONL.

Two sets of hand-written sources, one file per label each:

* ``models/data/*.txt`` (lines ``domain|text``): the training sources. Within
  every (label, domain) group, shuffled with ``SPLIT_SEED``,
  ``VALIDATION_FRACTION`` of the rows (rounded, at least one when the group
  has 3+) go to ``validation``, the rest to ``train``.
* ``models/data/heldout/*.txt`` (lines ``domain|style|text``): the held-out
  set, written separately in other phrasing habits (``STYLES``); split
  ``heldout``.

In both, a literal ``\\n`` in the text is a line break (bullet lists).

``python -m novacron.models.dataset`` rebuilds ``models/tasks.jsonl``.
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
    "qa", "virtualization", "ecommerce", "fintech", "gaming", "iot", "healthcare", "analytics",
)
# Phrasing habits of the held-out set (the training sources are plain requests).
STYLES: tuple[str, ...] = ("ticket", "story", "nonnative", "bullets", "chat")
SPLITS: tuple[str, ...] = ("train", "validation", "heldout")
SOURCE_FILES = {
    "simple": "simple.txt", "medium": "medium.txt", "complex": "complex.txt",
    "very-complex": "very_complex.txt",
}
SPLIT_SEED = 20261124
VALIDATION_FRACTION = 0.2
HELDOUT_DIR = "heldout"
DATASET_FILE = "tasks.jsonl"
MODELS_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Example:
    text: str
    label: str
    domain: str
    split: str
    style: str = ""   # phrasing habit, held-out rows only


def normalised_key(text: str) -> str:
    """What two descriptions share when they are the same text (case, spacing)."""
    return " ".join(text.lower().split())


def _source_lines(path: Path) -> list[tuple[int, str]]:
    return [(n, line) for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
            if line.strip() and not line.startswith("#")]


def read_sources(data_dir: Path = MODELS_DIR / "data") -> list[tuple[str, str, str]]:
    """(text, label, domain) from the hand-written training sources, in file order."""
    rows: list[tuple[str, str, str]] = []
    seen: set[str] = set()
    for label, name in SOURCE_FILES.items():
        path = data_dir / name
        for lineno, line in _source_lines(path):
            domain, sep, text = line.partition("|")
            if not sep or domain not in DOMAINS or not text.strip():
                raise ValueError(f"{path}:{lineno}: expected 'domain|text' with a known domain")
            text = text.strip().replace("\\n", "\n")
            key = normalised_key(text)
            if key in seen:
                raise ValueError(f"{path}:{lineno}: duplicate description")
            seen.add(key)
            rows.append((text, label, domain))
    return rows


def read_heldout(data_dir: Path = MODELS_DIR / "data" / HELDOUT_DIR) -> list[Example]:
    """The separately written held-out set (``domain|style|text``), in file order."""
    out: list[Example] = []
    seen: set[str] = set()
    for label, name in SOURCE_FILES.items():
        path = data_dir / name
        for lineno, line in _source_lines(path):
            parts = line.split("|", 2)
            if len(parts) != 3 or parts[0] not in DOMAINS or parts[1] not in STYLES \
                    or not parts[2].strip():
                raise ValueError(f"{path}:{lineno}: expected 'domain|style|text' with a known "
                                 "domain and style")
            text = parts[2].strip().replace("\\n", "\n")
            key = normalised_key(text)
            if key in seen:
                raise ValueError(f"{path}:{lineno}: duplicate description")
            seen.add(key)
            out.append(Example(text, label, parts[0], "heldout", parts[1]))
    return out


def split_rows(rows: list[tuple[str, str, str]]) -> list[Example]:
    """Stratified by (label, domain), deterministic for a given SPLIT_SEED."""
    groups: dict[tuple[str, str], list[int]] = {}
    for i, (_, label, domain) in enumerate(rows):
        groups.setdefault((label, domain), []).append(i)
    rng = random.Random(SPLIT_SEED)
    val: set[int] = set()
    for key in sorted(groups):
        idx = groups[key][:]
        rng.shuffle(idx)
        n_val = round(len(idx) * VALIDATION_FRACTION)
        if len(idx) >= 3:
            n_val = max(n_val, 1)
        val.update(idx[:n_val])
    return [Example(t, lab, dom, "validation" if i in val else "train")
            for i, (t, lab, dom) in enumerate(rows)]


def build(data_dir: Path = MODELS_DIR / "data") -> list[Example]:
    """Everything that goes into ``tasks.jsonl``; refuses held-out text seen in training."""
    examples = split_rows(read_sources(data_dir))
    known = {normalised_key(e.text) for e in examples}
    heldout = read_heldout(data_dir / HELDOUT_DIR)
    leaked = [e.text for e in heldout if normalised_key(e.text) in known]
    if leaked:
        raise ValueError(f"held-out descriptions also in the training sources: {leaked[:3]}")
    return examples + heldout


def write_jsonl(examples: list[Example], path: Path) -> None:
    with path.open("w", encoding="utf-8") as fh:
        for ex in examples:
            doc = {"text": ex.text, "label": ex.label, "domain": ex.domain, "split": ex.split}
            if ex.style:
                doc["style"] = ex.style
            fh.write(json.dumps(doc, ensure_ascii=False) + "\n")


def load() -> list[Example]:
    """The bundled dataset (works from an installed package too)."""
    text = resources.files("novacron.models").joinpath(DATASET_FILE).read_text(encoding="utf-8")
    out = []
    for line in text.splitlines():
        if line.strip():
            doc = json.loads(line)
            out.append(Example(doc["text"], doc["label"], doc["domain"], doc["split"],
                               doc.get("style", "")))
    return out


def dataset_sha256() -> str:
    data = resources.files("novacron.models").joinpath(DATASET_FILE).read_bytes()
    return hashlib.sha256(data).hexdigest()


def main() -> int:
    examples = build()
    write_jsonl(examples, MODELS_DIR / DATASET_FILE)
    counts: dict[tuple[str, str], int] = {}
    for ex in examples:
        counts[(ex.label, ex.split)] = counts.get((ex.label, ex.split), 0) + 1
    for label in LABELS:
        print(f"{label:13} " + "  ".join(f"{split} {counts.get((label, split), 0):4}"
                                         for split in SPLITS))
    print(f"wrote {len(examples)} examples to {MODELS_DIR / DATASET_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
