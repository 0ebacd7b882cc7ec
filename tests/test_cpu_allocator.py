"""launch/cpu_allocator.py: with the thresholds raised, a freed 64 MiB tensor stays in the heap
for the next step (no fresh mapping to fault in); with glibc's defaults it is unmapped."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import sys
import torch
from launch.cpu_allocator import keep_large_allocations

def rss_kib():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS"))

print("taken" if keep_large_allocations() else "not taken")
x = torch.ones(64 << 18)  # 64 MiB of fp32, touched
alive = rss_kib()
del x
print(alive - rss_kib())  # KiB returned to the system by the free
"""


def _child(env: dict[str, str]) -> tuple[str, int]:
    result = subprocess.run(
        [sys.executable, "-c", CHILD],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, **env},
        timeout=120,
        check=True,
    )
    taken, returned = result.stdout.split("\n")[:2]
    return taken, int(returned)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_large_tensors_stay_in_the_heap_and_the_opt_out_leaves_malloc_alone() -> None:
    taken, returned_kib = _child({"SCALETRAIN_KEEP_ALLOCATIONS": "1"})
    assert taken == "taken"
    assert returned_kib < 8 << 10  # kept for reuse (less than 8 of the 64 MiB returned)
    # Negative control: glibc's defaults map the block alone and unmap it on free.
    taken, returned_kib = _child({"SCALETRAIN_KEEP_ALLOCATIONS": "0"})
    assert taken == "not taken"
    assert returned_kib > 56 << 10
