"""Result pictures drawn on every core: this process and, for a long list, one worker process.

Drawing a picture (tiles pasted, captions fitted, a JPEG encoded) holds the GIL most of the time,
so two threads draw no faster than one (slower, measured). A list of at least PROCESS_AT pictures is
shared with a worker process, `python -m pipeline.pictures` (a plain subprocess, not
multiprocessing, so that it never imports the caller's __main__: a user's script without a main
guard is not run again; -P and its PYTHONPATH make it import this process's `pipeline`). It imports
the drawing code and the store reader, with Pillow and numpy (~0.5 s), and reads chunks of
jobs, pickled, from its stdin, answering each with the count it drew (only the answers go to its
stdout). Both sides take chunks from
the two ends of the list until they meet. The worker reads the same thumbnail files; its pictures
are byte-identical to this process's (the same code, the same inputs). A worker that cannot start
or fails leaves its chunks to this process, which draws them itself.
"""

from __future__ import annotations

import logging
import os
import pickle
import site
import struct
import subprocess
import sys
import tempfile
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from .embedders import available_cores
from .plots import compose_matches, save_jpeg
from .store import ThumbnailReader

log = logging.getLogger(__name__)

PROCESS_AT = 200  # pictures: below this a worker's start-up (~0.5 s) is not won back
CHUNK = 16  # pictures a side takes at a time


@dataclass(frozen=True)
class PictureJob:
    """One composite: the query's thumbnail row and caption, then each match's row and caption."""

    path: str
    query: int
    query_label: str
    rows: tuple[int, ...]
    labels: tuple[str, ...]


def draw_jobs(thumbnail_files: Sequence[str], jobs: Sequence[PictureJob]) -> int:
    """Draw `jobs` from the thumbnails in these files (a ThumbnailReader's, in its order); the count."""
    reader = ThumbnailReader(*thumbnail_files)
    try:
        for job in jobs:
            tiles = [reader[j].copy() for j in job.rows]
            save_jpeg(compose_matches(reader[job.query].copy(), job.query_label, tiles, job.labels), job.path)
    finally:
        reader.close()
    return len(jobs)


def draw_pictures(thumbnail_files: Sequence[str], jobs: Sequence[PictureJob],
                  done: Callable[[int], None] = lambda n: None, process_at: int = PROCESS_AT) -> int:
    """Draw every job: here alone, or here and in one worker process (see the module's doc).

    Args:
        done: called with each chunk's count as it is drawn (a progress bar), from either side.
    Returns:
        the pictures the worker drew (0 when it did not run).
    """
    files = [str(f) for f in thumbnail_files]
    chunks = deque(list(jobs[i : i + CHUNK]) for i in range(0, len(jobs), CHUNK))
    if not jobs or len(jobs) < process_at or available_cores() < 2 or getattr(sys, "frozen", False):
        for chunk in chunks:
            done(draw_jobs(files, chunk))
        return 0
    drawn_there = [0]
    left: list[list[PictureJob]] = []
    stop = threading.Event()  # this process stopped (Ctrl-C, an error): the worker takes no more

    def feed(worker: _Worker, chunk: list[PictureJob]) -> None:
        while True:
            try:
                drawn_there[0] += worker.draw(files, chunk)
            except Exception as e:  # the worker did not start, or died: this process draws the rest
                log.warning("result pictures: the drawing worker failed (%s); drawing here instead", e)
                left.append(chunk)
                return
            done(len(chunk))
            try:
                if stop.is_set():
                    return
                chunk = chunks.pop()  # from the end; this process takes from the front
            except IndexError:
                return

    try:
        worker = _Worker()
    except OSError as e:
        log.warning("result pictures: the drawing worker did not start (%s); drawing here instead", e)
        for chunk in chunks:
            done(draw_jobs(files, chunk))
        return 0
    try:
        # the worker's first chunk is taken here, so that it has one however fast this side goes
        feeder = threading.Thread(target=feed, args=(worker, chunks.pop()), name="pictures-feed", daemon=True)
        feeder.start()
        try:
            while True:
                try:
                    chunk = chunks.popleft()
                except IndexError:
                    break
                done(draw_jobs(files, chunk))
        finally:
            stop.set()
            feeder.join()
    finally:  # a second Ctrl-C during the join still ends the worker
        worker.close()
    for chunk in left:
        done(draw_jobs(files, chunk))
    return drawn_there[0]


class _Worker:
    """`python -m pipeline.pictures` as a subprocess: one pickled (files, jobs) a message on its
    stdin, each answered by a line with the count it drew."""

    def __init__(self) -> None:
        # The `pipeline` this process runs, not one in the current folder (-P) or an older install:
        # its folder first, unless it is a site-packages folder (already on the path, after the
        # standard library, where it must stay).
        root = str(Path(__file__).resolve().parents[1])
        env = dict(os.environ)
        if root not in {*site.getsitepackages(), site.getusersitepackages()}:
            env["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
        self.err = tempfile.TemporaryFile()  # not a pipe: a worker with much to say never blocks on it
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-P", "-m", "pipeline.pictures"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=self.err, env=env, start_new_session=True,  # Ctrl-C is the run's, which stops it
            )
        except BaseException:
            self.err.close()
            raise

    def draw(self, files: list[str], jobs: list[PictureJob]) -> int:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        message = pickle.dumps((files, jobs), protocol=pickle.HIGHEST_PROTOCOL)
        try:
            self.proc.stdin.write(struct.pack("<Q", len(message)) + message)
            self.proc.stdin.flush()
            answer = self.proc.stdout.readline()
        except OSError as e:
            said = self._said()  # waits for the worker's end first
            raise RuntimeError(f"{type(e).__name__}: {e}{said}") from None
        if not answer.strip().isdigit():
            said = self._said()
            raise RuntimeError(f"exit code {self.proc.poll()}{said}")
        return int(answer)

    def _said(self) -> str:
        """The worker's last words (its stderr), once it has ended."""
        try:
            self.proc.wait(timeout=5)
            self.err.seek(0)
            err = self.err.read().decode(errors="replace").strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""
        return f": {err.splitlines()[-1]}" if err else ""

    def close(self) -> None:
        """Ends the worker: EOF on its stdin, and killed if it does not stop at once."""
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
            self.proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.err.close()


def _serve(stdin: BinaryIO, stdout: BinaryIO) -> None:
    """The worker's loop: draw each message's jobs, answer with the count; stop at EOF. `stdout`
    carries only the answers (see the `__main__` block: anything printed goes to stderr)."""
    while True:
        head = stdin.read(8)
        if len(head) < 8:
            return
        files, jobs = pickle.loads(stdin.read(struct.unpack("<Q", head)[0]))
        stdout.write(f"{draw_jobs(files, jobs)}\n".encode())
        stdout.flush()


def picture_name(file: str) -> str:
    """The result picture of the item whose image file is `file`."""
    return f"{Path(file).stem}_matches.jpg"


if __name__ == "__main__":
    answers = os.fdopen(os.dup(1), "wb")  # the answers' own descriptor; whatever a library prints
    os.dup2(2, 1)  # to fd 1 or sys.stdout goes to stderr from here on
    sys.stdout = sys.stderr
    _serve(sys.stdin.buffer, answers)
