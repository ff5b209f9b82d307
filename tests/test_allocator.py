"""entityclip_hf.allocator: glibc's malloc set from inside the process to keep freed memory (finetune.py calls it)."""

import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from entityclip_hf import allocator
from entityclip_hf.allocator import keep_freed_memory

glibc_only = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc only"
)

# A fresh process allocates and touches a 24 MiB block (an activation-sized one), frees it, and prints how much of it
# is still resident: glibc's defaults hand it back to the kernel (mmap'd, then munmap'd on free); kept, it stays.
_PROBE = textwrap.dedent(
    """
    import ctypes, importlib.util, sys

    # The module alone (stdlib only), not the package: importing transformers would cost seconds per process.
    spec = importlib.util.spec_from_file_location("allocator", sys.argv[2])
    allocator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(allocator)

    def rss_kib():
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))

    if sys.argv[1] == "keep":
        applied, why = allocator.keep_freed_memory()
        assert applied, why
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    size = 24 * 1024 * 1024
    before = rss_kib()
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    libc.free(block)
    print(rss_kib() - before)
    """
)


def resident_after_free_kib(mode: str) -> int:
    result = subprocess.run(
        [sys.executable, "-c", _PROBE, mode, allocator.__file__],
        capture_output=True, text=True, timeout=120,
        env={"PATH": "/usr/bin:/bin"},  # no GLIBC_TUNABLES or LD_PRELOAD inherited from the test run
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return int(result.stdout.strip())


@glibc_only
def test_freed_memory_stays_resident_only_when_kept():
    assert resident_after_free_kib("default") < 4 * 1024  # handed back to the kernel
    assert resident_after_free_kib("keep") > 20 * 1024  # kept for the next allocation


@glibc_only
@pytest.mark.parametrize(
    "variable, value, reason",
    [
        ("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=1", "GLIBC_TUNABLES already sets malloc"),
        ("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2", "jemalloc is preloaded"),
    ],
)
def test_user_allocator_choices_are_left_alone(monkeypatch, variable, value, reason):
    monkeypatch.setenv(variable, value)
    applied, why = keep_freed_memory()
    assert not applied and reason in why


def test_finetune_keeps_freed_memory_by_default_and_can_be_told_not_to():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    from finetune import parse_args

    assert parse_args([]).malloc_keep_freed is True
    assert parse_args(["--malloc_keep_freed", "false"]).malloc_keep_freed is False
