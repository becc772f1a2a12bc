"""The build's process-level memory setting (pipelines/build_corpus.py `fixed_mmap_threshold`)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from pipelines import build_corpus

glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# Free a 30 MiB mapped block (glibc then raises its threshold to 30 MiB unless it is fixed), then make
# and free a 16 MiB buffer, and print how much resident memory that left behind.
PROBE = """
import ctypes, sys
libc = ctypes.CDLL("libc.so.6")
if sys.argv[1] != "sliding":
    assert libc.mallopt(-3, int(sys.argv[1]))  # what fixed_mmap_threshold does, without importing Beam
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096
big = libc.malloc(30 * 2**20); ctypes.memset(big, 1, 30 * 2**20); libc.free(big)
keep = libc.malloc(1024)  # something that stays, above where the buffer lands
before = rss()
buf = libc.malloc(16 * 2**20); ctypes.memset(buf, 1, 16 * 2**20)
after = libc.malloc(1024)  # and something allocated after it, as records are
libc.free(buf)
print(rss() - before)
"""


def _left_behind(mode) -> int:
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    out = subprocess.run([sys.executable, "-c", PROBE, str(mode)], capture_output=True, text=True, env=env, check=True)
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not glibc, reason="mallopt is glibc's")
def test_a_freed_large_buffer_goes_back_to_the_system_only_with_the_fixed_threshold():
    assert _left_behind("sliding") >= 8 * 2**20  # glibc's default: the heap keeps it
    assert _left_behind(build_corpus.MMAP_THRESHOLD) < 2 * 2**20


@pytest.mark.skipif(not glibc, reason="mallopt is glibc's")
def test_the_build_sets_it(monkeypatch):
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    assert build_corpus.fixed_mmap_threshold() is True


def test_users_own_setting_wins(monkeypatch):
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "1048576")
    assert build_corpus.fixed_mmap_threshold() is False
