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
~/.cache/fashion-pipeline. What it gives is the other kind's *kernels* on this CPU's cores, caches and
memory: the arithmetic is that CPU's exactly (int8 results bit for bit where the kernel is the same),
the speed is not, so figures made under a mask are labelled so and never stand in for the machine
itself. `pipeline.machine.cpu_info` reports the masked instruction sets, so an export under a mask
chooses what it would choose there.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from pipeline.machine import CPUID_MASK_ENV, CPUID_MASKS

SOURCE = Path(__file__).with_name("cpuid_mask.c")
KINDS = tuple(CPUID_MASKS)


def unavailable() -> str | None:
    """Why a mask cannot run here, or None when it can."""
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"CPUID masking needs Linux on x86-64 (this is {sys.platform} on {platform.machine()})"
    try:
        flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("flags")), [])
    except OSError as e:
        return f"cannot read /proc/cpuinfo: {e}"
    if "cpuid_fault" not in flags:
        return "this CPU (or its hypervisor) offers no CPUID faulting (no cpuid_fault in /proc/cpuinfo)"
    if _compiler() is None:
        return "no C compiler (cc or gcc) to build the CPUID mask"
    return None


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def library() -> Path:
    """The mask's shared library, built from cpuid_mask.c on first use (cached by source hash)."""
    reason = unavailable()
    if reason:
        raise RuntimeError(reason)
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:12]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fashion-pipeline"
    built = cache / f"cpuid_mask-{digest}.so"
    if not built.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        partial = built.with_name(f"{built.name}.{os.getpid()}")
        compiler = _compiler()
        assert compiler is not None  # unavailable() said so
        done = subprocess.run([compiler, "-O2", "-shared", "-fPIC", "-o", str(partial), str(SOURCE)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"building the CPUID mask failed:\n{done.stderr.strip()}")
        partial.replace(built)  # atomic: parallel builders (test workers) each write their own first
    return built


def environment(kind: str, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """`base` (default os.environ) with the mask for `kind` preloaded. Python's fault handler is left
    off in the child: it would take SIGSEGV, by which the mask answers CPUID."""
    if kind not in CPUID_MASKS:
        raise ValueError(f"unknown CPU kind {kind!r}; expected one of {', '.join(KINDS)}")
    env = dict(os.environ if base is None else base)
    env.pop("PYTHONFAULTHANDLER", None)
    preload = [str(library())] + [p for p in env.get("LD_PRELOAD", "").split() if "cpuid_mask" not in p]
    env["LD_PRELOAD"] = " ".join(preload)
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
    return subprocess.call(command, env=environment(args.kind))


if __name__ == "__main__":
    sys.exit(main())
