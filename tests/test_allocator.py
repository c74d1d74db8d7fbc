"""coatnet.allocator: the computing commands keep freed memory for reuse instead of page-faulting
it in again at every step (glibc), and leave a user's own malloc settings alone."""

import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")

# A step's worth of large blocks: ten 64 MiB tensors, each written, then freed.
PROGRAM = """
import resource, sys, torch
from coatnet.allocator import keep_freed_memory
print(keep_freed_memory() if sys.argv[1] == "keep" else "-")
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
torch.ones(16 << 20)
before = faults()
for _ in range(10):
    torch.ones(16 << 20)
print(faults() - before)
"""


def _run(mode: str, **env: str) -> tuple[str, int]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    out = subprocess.run([sys.executable, "-c", PROGRAM, mode], env=environ | env, capture_output=True, text=True,
                         check=True).stdout.split()
    return out[0], int(out[1])


@pytest.fixture(scope="module")
def default() -> int:
    """The page faults of the program with glibc's defaults: the measure of every case."""
    return _run("default")[1]


def test_freed_blocks_are_reused_without_page_faults(default):
    applied, kept = _run("keep")
    # by default each 64 MiB block is a fresh mmap, faulted in page by page (16,384 pages of 4 KiB)
    # ten times; kept, the heap serves each from the last one's memory (measured: 16,384 against 163,850)
    assert applied == "True" and kept <= default / 5


@pytest.mark.parametrize("env,applied", [({"MALLOC_ARENA_MAX": "2"}, False),
                                         ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, False),
                                         ({"GLIBC_TUNABLES": "glibc.pthread.rseq=0"}, True)])  # not malloc's
def test_a_users_own_malloc_settings_are_left_alone(env, applied, default):
    result, faults = _run("keep", **env)
    assert result == str(applied) and (faults <= default / 5 if applied else faults >= default / 2)
