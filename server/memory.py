"""The process's memory as the kernel sees it: the container's ceiling, resident memory, and the
peak reached by one piece of work (how many bytes per input pixel a graph needs).

Linux only (procfs and cgroups); elsewhere the ceiling is unknown and a probe measures nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import re
from collections.abc import Callable
from functools import cache
from pathlib import Path

CGROUP = Path("/sys/fs/cgroup")
UNLIMITED = 1 << 60  # cgroup v1 says "no limit" with a number near 2**63
HEADROOM = 0.2  # share of a ceiling left for what budgets do not count (Python, buffers)
# A measured peak is scaled by this: onnxruntime's arena grows in chunks, so a batch of
# several large inputs peaked up to 1.27x what one reference-size input per pixel suggested.
MEMORY_MARGIN = 1.3


def activation_room(ceiling: int) -> int:
    """Bytes left for activations under `ceiling`: less HEADROOM, less what is resident now."""
    return int(ceiling * (1 - HEADROOM)) - resident()


def per_pixel(peak: int, pixels: int) -> int:
    """Activation bytes per input pixel from a run of `pixels` that peaked `peak` bytes above
    rest, with the MEMORY_MARGIN."""
    return int(MEMORY_MARGIN * peak / pixels) + 1


def _cgroup_limit_files() -> list[Path]:
    """The memory-limit files that apply to this process: cgroup v2's `memory.max` and v1's
    `memory.limit_in_bytes`, for its own cgroup (from /proc/self/cgroup) and at the mount's
    root (inside a container the own cgroup is usually the root)."""
    files = []
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        relative = path.lstrip("/")
        if controllers == "":
            files.append(CGROUP / relative / "memory.max")
        elif "memory" in controllers.split(","):
            files.append(CGROUP / "memory" / relative / "memory.limit_in_bytes")
    files += [CGROUP / "memory.max", CGROUP / "memory" / "memory.limit_in_bytes"]
    return files


def cgroup_limit() -> int | None:
    """The tightest memory limit of this process's cgroups, in bytes, or None without one."""
    limits = []
    for path in _cgroup_limit_files():
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < UNLIMITED:
            limits.append(int(text))
    return min(limits) if limits else None


def _status_kb(field: str) -> int:
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return 0
    found = re.search(rf"^{field}:\s+(\d+) kB", status, re.MULTILINE)
    return int(found.group(1)) if found else 0


def resident() -> int:
    """Resident memory of this process, in bytes (0 where procfs is missing)."""
    return 1024 * _status_kb("VmRSS")


def _reset_peak() -> bool:
    try:
        with open(f"/proc/{os.getpid()}/clear_refs", "w") as fp:
            fp.write("5")  # resets VmHWM to the current resident size
    except OSError:
        return False
    return True


def peak_during(work: Callable[[], object]) -> int | None:
    """Bytes by which resident memory rose at its highest while `work` ran, or None where the
    kernel cannot tell. Other threads' allocations count too: an overestimate, never an under-."""
    if not _reset_peak():
        return None
    before = resident()
    work()
    peak = 1024 * _status_kb("VmHWM")
    return max(peak - before, 0) if peak else None


@cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


def trim() -> None:
    """Hand the C heap's free memory back to the kernel (glibc's malloc_trim). onnxruntime's
    arena frees a large batch's chunks after the run, but glibc keeps freed heap pages mapped:
    without this, resident memory stays at the largest work seen, and a reload's or a large
    request's memory looks like a leak. A no-op where the C library has no malloc_trim."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
