"""Mutation testing of the core modules with mutmut: run, then score.

Each mutant is a small edit that looks like a real bug (a flipped comparison, a changed constant, a
dropped argument); the score is the share of mutants some test catches (or hangs on). Mutants that cannot change
behaviour (listed with the reason in tools/mutation_equivalent.txt) are left out of the score.
Slow: every mutant runs the tests that reach it, in a fresh process; not part of CI.

    python tools/mutation.py                 # run every core module, then print the scores
    python tools/mutation.py images search   # only these
    python tools/mutation.py --report        # scores of the last run, and the survivors to look at
    python tools/mutation.py --sample 40     # 40 mutants drawn at random (seeded) from each module
    python tools/mutation.py --survivors     # after adding tests: only the last run's survivors

On 2 cores every mutant costs seconds to minutes (the tests that reach it include end-to-end runs),
and the core modules have ~4,000 mutants: --sample scores a random sample of each module, which
estimates the score within a few points (the count is printed with the score).

Needs `pip install mutmut` (3.x). Configuration: [tool.mutmut] in pyproject.toml.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EQUIVALENT = ROOT / "tools" / "mutation_equivalent.txt"

# module -> mutmut name globs (main: the flag checks)
TARGETS = {
    "retrieval": ["pipeline.retrieval.*"],
    "store": ["pipeline.store.*"],
    "fileio": ["pipeline.fileio.*"],
    "gallery": ["pipeline.gallery.*"],
    "items": ["pipeline.items.*"],
    "images": ["pipeline.images.*"],
    "preprocess": ["pipeline.preprocess.*"],
    "search": ["pipeline.search.*"],
    "persons": ["pipeline.persons.*"],
    "main": ["main.x_validate*"],
}


def _module_of(name: str) -> str | None:
    for module, globs in TARGETS.items():
        if any(re.fullmatch(g.replace(".", r"\.").replace("*", ".*"), name) for g in globs):
            return module
    return None


def _results() -> dict[str, str]:
    out = subprocess.run(["mutmut", "results", "--all", "true"], cwd=ROOT, capture_output=True, text=True).stdout
    found = {}
    for line in out.splitlines():
        name, _, status = line.strip().rpartition(": ")
        if name:
            found[name] = status
    return found


def _sample(modules: list[str], per_module: int, seed: int) -> list[str]:
    """Up to per_module mutant names of each module, drawn at random among those not run yet."""
    import random

    rng = random.Random(seed)
    results = _results()
    names = []
    for module in modules:
        pool = sorted(n for n, status in results.items() if _module_of(n) == module and status == "not checked")
        names += rng.sample(pool, min(per_module, len(pool)))
    return names


def _equivalent() -> dict[str, str]:
    eq = {}
    if EQUIVALENT.is_file():
        for line in EQUIVALENT.read_text().splitlines():
            name, _, why = line.partition("#")
            if name.strip():
                eq[name.strip()] = why.strip()
    return eq


def report() -> int:
    results, equivalent = _results(), _equivalent()
    per: dict[str, Counter] = {}
    survivors: list[str] = []
    for name, status in sorted(results.items()):
        module = _module_of(name)
        if module is None:
            continue
        c = per.setdefault(module, Counter())
        if name in equivalent:
            c["equivalent"] += 1
        elif status == "killed":
            c["killed"] += 1
        elif status == "timeout":  # the tests hung on it: caught (CI would fail), counted as killed
            c["timeout"] += 1
        elif status in ("survived", "suspicious", "no tests"):
            c[status] += 1
            survivors.append(f"{name}: {status}")
        else:
            c["not run"] += 1
    print(
        "| module | mutants | equivalent | killed | survived | no tests | timeout | not run | score |\n"
        "|---|---|---|---|---|---|---|---|---|"
    )
    total = Counter()
    for module in TARGETS:
        c = per.get(module, Counter())
        total.update(c)
        scored = c["killed"] + c["survived"] + c["no tests"] + c["timeout"] + c["suspicious"]
        caught = c["killed"] + c["timeout"]
        print(
            f"| {module} | {sum(c.values())} | {c['equivalent']} | {c['killed']} | {c['survived']} | {c['no tests']} | "
            f"{c['timeout']} | "
            f"{c['not run']} | {caught / scored:.1%} |"
            if scored
            else f"| {module} | {sum(c.values())} | | | | | | {c['not run']} | - |"
        )
    scored = total["killed"] + total["survived"] + total["no tests"] + total["timeout"] + total["suspicious"]
    if scored:
        caught = total["killed"] + total["timeout"]
        print(
            f"\nall: {caught} of {scored} non-equivalent mutants killed or timed out ({caught / scored:.1%}); "
            f"{total['equivalent']} judged equivalent (tools/mutation_equivalent.txt)"
        )
    if survivors:
        print("\nsurvivors (see each with `mutmut show NAME`):\n  " + "\n  ".join(survivors))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("modules", nargs="*", help=f"modules to run, of {', '.join(TARGETS)} (default: all)")
    ap.add_argument("--report", action="store_true", help="only print the scores of the last run")
    ap.add_argument("--max-children", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--sample", type=int, default=0, help="run this many mutants per module, drawn at random")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--survivors", action="store_true", help="run again only the mutants that survived the last run")
    args = ap.parse_args()
    if unknown := [m for m in args.modules if m not in TARGETS]:
        ap.error(f"unknown module(s) {unknown}; choose from {', '.join(TARGETS)}")
    if not args.report:
        modules = args.modules or list(TARGETS)
        if args.survivors:  # after new tests: only the mutants the last run left alive
            equivalent = _equivalent()
            globs = [
                n
                for n, status in _results().items()
                if _module_of(n) in modules
                and status in ("survived", "timeout", "suspicious", "no tests")
                and n not in equivalent
            ]
        elif args.sample:
            globs = _sample(modules, args.sample, args.seed)
        else:
            globs = [g for m in modules for g in TARGETS[m]]
        if not globs:
            print("no mutants to run")
            return report()
        env = {**os.environ, "FASHION_TEST_ASSET_CACHE": str(ROOT / "mutants" / ".test-assets")}
        (ROOT / "mutants" / ".test-assets").mkdir(parents=True, exist_ok=True)
        try:
            subprocess.run(
                ["mutmut", "run", "--max-children", str(args.max_children), *globs], cwd=ROOT, env=env, check=False
            )
        except FileNotFoundError:
            print("mutmut is not installed: pip install 'mutmut>=3.8'", file=sys.stderr)
            return 2
    return report()


if __name__ == "__main__":
    sys.exit(main())
