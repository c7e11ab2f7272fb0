"""The distribution builds as a wheel with compiled extensions under novacron/ only."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO


@pytest.mark.slow
def test_wheel_layout(tmp_path: Path) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(REPO)],
        capture_output=True, text=True, timeout=900,
    )
    assert res.returncode == 0, res.stderr[-4000:]
    (wheel,) = tmp_path.glob("novacron-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.startswith("novacron-")}
    assert tops == {"novacron"}, tops
    for pkg in ("agent", "coordinator", "native", "bench", "models"):
        assert f"novacron/{pkg}/__init__.py" in names
    pyx = sorted(p.stem for p in (REPO / "native").glob("*.pyx"))
    built = sorted(n.split("/")[-1].split(".")[0] for n in names if n.startswith("novacron/native/") and n.endswith(".so"))
    assert built == pyx
