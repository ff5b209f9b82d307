"""glibc's malloc set to keep the memory a training step frees, so the next step does not page it in again.

With glibc's defaults, a CPU training step frees its activations (tens of blocks of 1-30 MiB each) and malloc hands
the top of the heap and its mmap'd blocks back to the kernel; the next step page-faults the same gigabytes in again,
zeroed. That costs 5-25% of a ViT-B/32 step at batch 32 on CPU, more for EntityCLIP's larger activations
(bench/README.md, "Allocator"). `keep_freed_memory()` applies, from inside the running process, what the
`GLIBC_TUNABLES` setting of the benchmarks does at process start: a fixed mmap threshold at glibc's maximum (blocks
below 32 MiB come from the heap and are reused) and no trimming of the heap. The price is that the process keeps its
peak resident memory until it exits, which a training process reaches every step anyway.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

# mallopt(3) parameters (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# glibc's largest mmap threshold on 64-bit systems (DEFAULT_MMAP_THRESHOLD_MAX = 4 MiB x sizeof(long)); mallopt
# refuses larger values. Fixing it also stops glibc's dynamic adjustment of the threshold.
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024
# mallopt(M_TRIM_THRESHOLD, -1) disables trimming altogether (mallopt(3)).
TRIM_DISABLED = -1
# Allocators that replace glibc's malloc through LD_PRELOAD keep freed memory by themselves (and glibc's mallopt
# would not reach them).
REPLACEMENT_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")


def keep_freed_memory() -> tuple[bool, str]:
    """Set glibc's malloc to keep freed memory (this process and the processes it forks). Returns (applied, why).

    Nothing is changed, and the reason says so, where it would be wrong or useless: not glibc (macOS, musl), an
    allocator preloaded in its place, or `GLIBC_TUNABLES` already choosing malloc settings (the user's choice wins).
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False, f"not glibc's malloc ({platform.system()} {' '.join(platform.libc_ver()).strip()})"
    preloaded = os.environ.get("LD_PRELOAD", "")
    for name in REPLACEMENT_ALLOCATORS:
        if name in preloaded:
            return False, f"{name} is preloaded (LD_PRELOAD) and manages memory itself"
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return False, "GLIBC_TUNABLES already sets malloc options; left as they are"
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success, 0 on error.
    if libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX) != 1 or libc.mallopt(M_TRIM_THRESHOLD, TRIM_DISABLED) != 1:
        return False, "glibc's mallopt refused the settings"
    return True, f"glibc malloc keeps freed memory (mmap threshold {MMAP_THRESHOLD_MAX >> 20} MiB, no trimming)"
