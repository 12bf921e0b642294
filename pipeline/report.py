"""Run reporting: stage timers, counts, recorded failures, peak memory, and the closing summary."""

from __future__ import annotations

import logging
import re
import resource
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from .machine import cpu_info, cpu_label

EXIT_OK = 0
EXIT_FATAL = 1
EXIT_USAGE = 2
EXIT_ITEM_FAILURES = 3

# Control characters (a newline and a tab aside) and the marks that reorder a line (U+202E shows
# the rest of a line reversed): a file named "\x1b[2J....jpg" cleared the operator's screen when a
# summary named it. Shown as Python writes them instead (a lone surrogate too, which no terminal
# encoding can write).
_NOT_FOR_A_TERMINAL = re.compile(
    "[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def terminal_text(text: str) -> str:
    """text as it may be printed: each control character (but newline and tab) and each mark that
    reorders a line written as its escape (\\x1b, \\u202e); any other text unchanged."""
    return _NOT_FOR_A_TERMINAL.sub(lambda m: ascii(m.group())[1:-1], text)


STAGE_SAID_AFTER_S = 10.0
STAGE_SAID_EVERY_S = 30.0
log = logging.getLogger(__name__)


def _say_while(done: threading.Event, active: list[threading.Event], mode: str, stage: str, started: float) -> None:
    """Log that `stage` is at work until `done`: first after STAGE_SAID_AFTER_S, then every
    STAGE_SAID_EVERY_S; not while a stage inside it is under way (that one says), nor while a
    progress bar is on the screen (it says as much, and a line written under it breaks it)."""
    wait = STAGE_SAID_AFTER_S
    while not done.wait(wait):
        wait = STAGE_SAID_EVERY_S
        from tqdm import tqdm

        if active and active[-1] is done and not getattr(tqdm, "_instances", None):
            log.info("%s: %s at work, %.0f s so far", mode, stage, time.perf_counter() - started)


def _one_line(name: str) -> str:
    """A name with its line breaks written as escapes (\\n, \\r): one line of a list, whatever the name."""
    return name.replace("\n", "\\n").replace("\r", "\\r")


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, in MiB."""
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / (1024 * 1024)


@dataclass
class RunSummary:
    """What a run did: counts, failures (item, reason), seconds per stage, outputs, notes."""

    mode: str
    counts: dict[str, int] = field(default_factory=dict)
    failures: list[tuple[str, str]] = field(default_factory=list)
    # Seconds per stage, keyed by a stable name; "embed/infer" is a part of "embed". Programs read
    # these names; people read the labels (stage_labels, where a label is not the name itself).
    stages: dict[str, float] = field(default_factory=dict)
    stage_labels: dict[str, str] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    model: str = ""  # what made the vectors the run used (VectorIdentity.label), said in the summary
    # Results as a plain-text table for the terminal (e.g. --evaluate's markdown table). The HTML
    # report draws the same results as a real table from the mode's own data, so it shows no copy.
    tables: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)
    report_section: str = ""  # the id of the report section the run wrote (webreport.write_section), if any
    _active: list[threading.Event] = field(default_factory=list, repr=False, compare=False)  # stages under way

    @contextmanager
    def stage(self, name: str, label: str | None = None) -> Iterator[None]:
        """Time a stage; one that runs long without a progress bar of its own says it is at work
        (after STAGE_SAID_AFTER_S, then every STAGE_SAID_EVERY_S: a 100k catalogue's index, neighbours
        and report ran 110 s with nothing on the screen, a hang to look at)."""
        t = time.perf_counter()
        done = threading.Event()
        self._active.append(done)  # of nested stages, the innermost says
        said = threading.Thread(target=_say_while, args=(done, self._active, self.mode, label or name, t),
                                daemon=True)
        said.start()
        try:
            yield
        finally:
            done.set()
            self._active.remove(done)
            self.timed(name, time.perf_counter() - t, label)

    def timed(self, name: str, seconds: float, label: str | None = None) -> None:
        """Add seconds to stage `name` (shown as `label` when given)."""
        self.stages[name] = self.stages.get(name, 0.0) + seconds
        if label is not None:
            self.stage_labels[name] = label

    def stage_rows(self) -> list[tuple[str, str, int, float]]:
        """(name, label, depth, seconds) per stage, each part right after the stage it belongs to."""
        def key(name: str) -> list[int]:
            parts = name.split("/")
            return [order["/".join(parts[: k + 1])] for k in range(len(parts))]

        order = {n: k for k, n in enumerate(self.stages)}
        for name in self.stages:  # a part whose whole was never timed still sorts with its siblings
            for k in range(1, name.count("/") + 1):
                order.setdefault("/".join(name.split("/")[:k]), order[name])
        rows = sorted(self.stages, key=key)
        return [(n, self.stage_labels.get(n, n), n.count("/"), self.stages[n]) for n in rows]

    def count(self, key: str, n: int = 1) -> None:
        self.counts[key] = self.counts.get(key, 0) + n

    def fail(self, item: str, reason: str) -> None:
        self.failures.append((item, reason))

    @property
    def exit_code(self) -> int:
        return EXIT_ITEM_FAILURES if self.failures else EXIT_OK

    def failure_lines(self, max_failures: int = 10) -> list[str]:
        """The failed items and why (the first max_failures), or nothing."""
        if not self.failures:
            return []
        lines = [f"failures: {len(self.failures)} item(s):"]
        # a name's own line breaks written as escapes: a file named "x.jpg\n  - y.jpg: ok" made a line of its own
        lines += [f"  - {_one_line(item)}: {reason}" for item, reason in self.failures[:max_failures]]
        if len(self.failures) > max_failures:
            lines.append(f"  ... and {len(self.failures) - max_failures} more")
        return lines

    def format(self, max_failures: int = 10, verbose: bool = False) -> str:
        wall = time.perf_counter() - self.started
        lines = [f"== {self.mode}: done in {wall:.1f} s, peak memory {peak_rss_mib():.0f} MiB"]
        if self.model:
            lines.append(f"model:    {self.model}")
        if verbose:  # int8 results and speeds depend on the CPU's instruction sets
            lines.append(f"cpu:      {cpu_label()}, {cpu_info()['cores']} cores")
        if self.counts:
            lines.append("counts:   " + ", ".join(f"{k} {v}" for k, v in self.counts.items()))
        if self.stages:
            rows = self.stage_rows()
            lines.append("stages:   " + ", ".join(f"{'  ' * depth}{label} {v:.1f} s" for _, label, depth, v in rows))
        for note in self.notes:
            lines.append(f"note:     {note}")
        for table in self.tables:
            lines += ["results:"] + [f"  {row}" for row in table.splitlines()]
        lines += self.failure_lines(max_failures)
        for name, where in self.outputs.items():
            lines.append(f"output:   {name} -> {where}")
        return "\n".join(lines)
