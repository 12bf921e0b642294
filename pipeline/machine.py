"""This machine's CPU: its model and the instruction sets that decide int8 speed and accuracy.

Recorded in every sidecar, benchmark output and verbose run summary, so figures (and int8 results)
from different machines are never compared blindly. On x86, u8 x s8 int8 GEMMs run on VNNI or AMX
where the CPU has them (exact int32 sums) and otherwise on AVX2 / AVX-512BW pair sums that saturate
at int16, which is why the int8 export keeps its weights to 7 bits (see export.py).
"""

from __future__ import annotations

import os
import platform
import threading
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

# The flags /proc/cpuinfo spells, in the order they are reported.
INT8_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8")
# benchmarks/cpu_kind.py runs a process with CPUID saying less than the CPU has (benchmarks/cpuid_mask.c,
# preloaded, named by this variable): the flags each kind hides, which cpu_info then leaves out.
CPUID_MASK_ENV = "FASHION_CPUID_MASK"
CPUID_MASKS = {"vnni": ("avx_vnni", "amx_int8"),
               "avx2": ("avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8")}


def cpuid_mask() -> str | None:
    """The CPU kind this process's CPUID is masked to (benchmarks/cpu_kind.py), or None: the variable
    counts only where the mask's library is loaded, as only then does CPUID say less."""
    kind = os.environ.get(CPUID_MASK_ENV)
    if kind not in CPUID_MASKS:
        return None
    try:
        return kind if "cpuid_mask" in Path("/proc/self/maps").read_text(errors="replace") else None
    except OSError:
        return None


@lru_cache(maxsize=1)
def _cpuinfo() -> tuple[str, frozenset[str], str]:
    """(model name, flags, vendor) of /proc/cpuinfo's first processor; ("", empty, "") without the file."""
    model, flags, vendor = "", frozenset[str](), ""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key == "vendor_id" and not vendor:
            vendor = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = frozenset(value.split())
    return model, flags, vendor


def cpu_flags() -> frozenset[str]:
    """Every flag /proc/cpuinfo gives this CPU (empty without it), masked or not."""
    return _cpuinfo()[1]


def cpu_vendor() -> str:
    """/proc/cpuinfo's vendor_id ("GenuineIntel", "AuthenticAMD"; "" without it). A CPUID mask
    (benchmarks/cpu_kind.py) leaves it as it is: the other kind's kernels run on this vendor's cores."""
    return _cpuinfo()[2]


@lru_cache(maxsize=1)
def cpu_info() -> dict[str, object]:
    """{"model": "AMD EPYC 7B13", "isa": ["avx2", "avx512f", ...], "cores": 2, "arch": "x86_64"}.

    The instruction sets are those of INT8_FLAGS that this CPU has; on a machine without
    /proc/cpuinfo (macOS, Windows) the list is empty and the model is platform.processor(). Under a
    CPUID mask (cpuid_mask()) the masked ones are left out and "masked" names the kind.
    """
    model, flags, _ = _cpuinfo()
    masked = cpuid_mask()
    info: dict[str, object] = {
        "model": model or platform.processor() or "unknown",
        "isa": [f for f in INT8_FLAGS if f in flags and f not in CPUID_MASKS.get(masked or "", ())],
        "cores": os.cpu_count() or 1,
        "arch": platform.machine(),
    }
    if masked:
        info["masked"] = masked
    return info


def cpu_label(info: dict[str, object] | None = None) -> str:
    """One line for messages: 'AMD EPYC [avx2 avx512f avx512bw avx512_vnni]'."""
    info = info or cpu_info()
    flags = info.get("isa") or []
    isa = (" ".join(flags) if isinstance(flags, Iterable) else "") or "no AVX2/AVX-512/VNNI/AMX flags found"
    masked = f" (CPUID masked to the {info['masked']} kind)" if info.get("masked") else ""
    return f"{info.get('model', 'unknown')} [{isa}]{masked}"


def tree_rss_bytes(pid: int) -> int:
    """Resident memory of a process and all its descendants, in bytes (0 once it is gone). Needs
    psutil, which Ray brings."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:  # ended between the listing and the reading
            pass
    return total


class TreeMemory:
    """The peak resident memory of this process and its descendants while a block runs, sampled on
    a thread every `every_s` seconds: with a Ray the run starts itself, its raylet, GCS and worker
    processes are this process's descendants, which getrusage(RUSAGE_SELF) does not count."""

    def __init__(self, every_s: float = 0.25) -> None:
        self.every_s, self.peak = every_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="tree-memory", daemon=True)

    def _sample(self) -> None:
        pid = os.getpid()
        while True:
            self.peak = max(self.peak, tree_rss_bytes(pid))
            if self._stop.wait(self.every_s):
                return

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak_mib(self) -> float:
        return self.peak / 2**20
