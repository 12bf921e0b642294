"""Run a command as if on another CPU kind: this CPU's own instructions, with CPUID saying less.

onnxruntime picks its int8 kernels by what CPUID says: AMX tiles, AVX-512 VNNI, or AVX2's pair sums
(which saturate at int16, the reason for the export's 7-bit weights). Under `cpuid_mask.c`, loaded
with LD_PRELOAD, a Xeon with AMX runs the kernels of the other kinds the README's tables name:

    vnni   AVX-512 VNNI without AMX or AVX-VNNI (the kernels of the AMD EPYC Zen 4 machines)
    avx2   AVX2 only: no AVX-512, no VNNI, no AMX

    python -m benchmarks.cpu_kind avx2 -- python -m benchmarks.embed --int8 static --compare none
    python -m benchmarks.cpu_kind --check           # can this machine do it? (prints why not)

It needs Linux on x86-64 with CPUID faulting (`cpuid_fault` in /proc/cpuinfo: Intel since Ivy Bridge,
and virtual machines under KVM) and a C compiler; the library is built once per source version under
~/.cache/fashion-visual-search/cpuid-mask. What it gives is the other kind's *kernels* on this CPU's
cores, caches and memory: the arithmetic is that CPU's exactly (int8 results bit for bit where the kernel is the same),
the speed is not, so figures made under a mask are labelled so and never stand in for the machine
itself. `pipeline.machine.cpu_info` reports the masked instruction sets, so an export under a mask
chooses what it would choose there.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from pipeline.fileio import user_cache_dir
from pipeline.machine import CPUID_MASK_ENV, CPUID_MASKS, cpu_flags

SOURCE = Path(__file__).with_name("cpuid_mask.c")
KINDS = tuple(CPUID_MASKS)


@functools.lru_cache(maxsize=1)
def unavailable() -> str | None:
    """Why a mask cannot run here, or None when it can: the platform, the flag, the compiler, then
    the library built and one masked child asked what it sees (once per process)."""
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"CPUID masking needs Linux on x86-64 (this is {sys.platform} on {platform.machine()})"
    if "cpuid_fault" not in cpu_flags():
        return "this CPU (or its hypervisor) offers no CPUID faulting (no cpuid_fault in /proc/cpuinfo)"
    try:
        if not _compiler():
            return "no C compiler (cc or gcc) to build the CPUID mask"
        built = _build()
        # a child that reads CPUID under the mask (numpy does at import) and says what it saw
        probe = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=120,
                               env={**os.environ, "LD_PRELOAD": str(built), CPUID_MASK_ENV: "avx2"})
    except (OSError, RuntimeError, ValueError, subprocess.SubprocessError) as e:
        return f"the CPUID mask cannot be built or run here: {e}"
    if probe.returncode != 0 or probe.stdout.strip() != "False":
        return f"a masked process fails here: {(probe.stderr.strip() or probe.stdout.strip())[-300:]}"
    return None


_PROBE = "from numpy._core._multiarray_umath import __cpu_features__ as f; print(f['AVX512F'])"


def _compiler() -> list[str]:
    return shlex.split(os.environ.get("CC", "")) or [c for c in (shutil.which("cc") or shutil.which("gcc"),) if c]


def _build() -> Path:
    """cpuid_mask.c built once per version of its source, under the tool's cache folder."""
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:12]
    cache = user_cache_dir("cpuid-mask").resolve()
    built = cache / f"cpuid_mask-{digest}.so"
    if any(c.isspace() or c == ":" for c in str(built)):  # LD_PRELOAD separates its entries so
        raise RuntimeError(f"the CPUID mask's cache path {built} has a space or a colon (LD_PRELOAD cannot name "
                           "it); set XDG_CACHE_HOME to another folder")
    if not built.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        partial = built.with_name(f"{built.name}.{os.getpid()}")
        done = subprocess.run([*_compiler(), "-O2", "-shared", "-fPIC", f'-DMASK_ENV="{CPUID_MASK_ENV}"',
                               "-o", str(partial), str(SOURCE), "-ldl"], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"building the CPUID mask failed:\n{done.stderr.strip()}")
        partial.replace(built)  # atomic: parallel builders (test workers) each write their own first
    return built


def library() -> Path:
    """The mask's shared library (built on first use), where it works here."""
    reason = unavailable()
    if reason:
        raise RuntimeError(reason)
    return _build()


def environment(kind: str, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """`base` (default os.environ) with the mask for `kind` preloaded (the program's own SIGSEGV
    handlers still run for real faults: the library keeps them aside)."""
    if kind not in CPUID_MASKS:
        raise ValueError(f"unknown CPU kind {kind!r}; expected one of {', '.join(KINDS)}")
    env = dict(os.environ if base is None else base)
    others = [p for p in re.split(r"[:\s]+", env.get("LD_PRELOAD", "")) if p and "cpuid_mask" not in p]
    env["LD_PRELOAD"] = " ".join([str(library()), *others])
    env[CPUID_MASK_ENV] = kind
    return env


def run(kind: str, command: Sequence[str], **kwargs) -> subprocess.CompletedProcess:
    """subprocess.run of `command` as on a CPU of `kind` (kwargs as subprocess.run's)."""
    return subprocess.run(list(command), env=environment(kind, kwargs.pop("env", None)), **kwargs)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cpu_kind", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", nargs="?", choices=KINDS, help="the CPU kind whose kernels to run")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command to run")
    parser.add_argument("--check", action="store_true", help="say whether this machine can mask CPUID, and exit")
    args = parser.parse_args(argv)
    if args.check:
        reason = unavailable()
        print(reason or f"CPUID masking works here: {', '.join(KINDS)}")
        return 1 if reason else 0
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if args.kind is None or not command:
        parser.error("give a CPU kind and, after --, the command to run")
    reason = unavailable()
    if reason:
        print(f"error: {reason}", file=sys.stderr)
        return 2
    code = subprocess.call(command, env=environment(args.kind))
    return 128 - code if code < 0 else code  # a signal's death as a shell says it


if __name__ == "__main__":
    sys.exit(main())
