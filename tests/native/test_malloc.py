"""native/malloc.py: with the agent's allocator thresholds, a freed 1 MiB frame's memory
is reused for the next one instead of being faulted in (and zeroed) afresh."""

from __future__ import annotations

import subprocess
import sys

CHILD = """
import os, resource, sys
from novacron.native.malloc import keep_freed_buffers
if sys.argv[1] == "tuned":
    assert keep_freed_buffers()
def frames():
    for i in range(50):  # four frames in flight at a time (written, then freed), as in a migration
        held = [bytearray(os.urandom(16)) * 65536 for _ in range(4)]
        del held
frames()  # warm-up: whatever the allocator keeps from here on
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
frames()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True,
                         timeout=60, check=True)
    return int(out.stdout.strip())


def test_freed_frames_are_reused_not_faulted_in_again() -> None:
    default, tuned = faults("default"), faults("tuned")
    print(f"page faults for 200 frames of 1 MiB: default {default}, tuned {tuned}")
    # a frame is 256 pages: the tuned process faults in (almost) none of them again
    assert tuned < 2000 < default, (default, tuned)
