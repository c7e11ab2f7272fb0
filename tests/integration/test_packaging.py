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
    for data in ("models/task_classifier.onnx", "coordinator/dashboard/index.html",
                 "coordinator/dashboard/app.js", "agent/guest/workload.c"):
        assert f"novacron/{data}" in names, data
    pyx = sorted(p.stem for p in (REPO / "native").glob("*.pyx"))
    built = sorted(n.split("/")[-1].split(".")[0] for n in names if n.startswith("novacron/native/") and n.endswith(".so"))
    assert built == pyx

    # The wheel alone (no repository on the path) must run: compiled kernels,
    # the bundled classifier, and the guest builder's sources.
    target = tmp_path / "site"
    res = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                          str(target), str(wheel)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    code = (
        "import sys, novacron, novacron.native as n\n"
        f"assert novacron.__file__.startswith({str(target)!r}), novacron.__file__\n"
        "import numpy as np, mmap, os\n"
        "mem = mmap.mmap(-1, 64 * n.PAGE_SIZE); mem[:5] = b'hello'\n"
        "scan = n.FingerprintTracker(mem, os.urandom(32)).scan()\n"
        "assert n.bitmap_count(scan.dirty) == 1, n.bitmap_count(scan.dirty)\n"
        "from novacron.coordinator.classifier.service import TaskService\n"
        "r = TaskService().classify('Fix the typo in the README title')\n"
        "assert r['label'] in ('simple', 'medium', 'complex', 'very-complex'), r\n"
        "from importlib import resources\n"
        "g = resources.files('novacron.agent.guest')\n"
        "assert (g / 'workload.c').is_file() and (g / 'init.sh').is_file()\n"
    )
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(target), "HOME": str(tmp_path)}
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
