"""File helpers every stage may use: atomic writes, memory-mapped .npy output, hashing, the output
folder's lock and the clean-up of a killed run's temp files. Knows files, not the pipeline.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import io
import json
import logging
import os
import re
import shutil
import stat
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from .errors import PipelineError

log = logging.getLogger(__name__)


def temp_file_beside(path: Path) -> tuple[int, str]:
    """A new temp file in path's folder (".<name>.<8 random>.tmp", as tempfile.mkstemp names them),
    open for writing, made with the mode open() gives a new file (0644 under the usual umask: the
    kernel applies the umask then) rather than mkstemp's 0600, so a store, its images and reports
    moved into place from it are readable by whoever reads the folder."""
    import secrets

    while True:
        tmp = str(path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666), tmp
        except FileExistsError:
            continue


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write bytes to `path` through a temp file in the same folder and os.replace.

    A killed process leaves either the old file or the new one, never half of one. There is no
    fsync: against power loss every file is covered by a sha256 recorded elsewhere (manifest,
    shard marker, sidecar) and checked before it is trusted, and an fsync per image costs more
    than the decode.
    """
    path = Path(path)
    fd, tmp = temp_file_beside(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        unlink_quietly(tmp)
        raise


def read_json_dict(path: str | Path) -> dict[str, Any]:
    """The JSON object in a small record file this tool keeps beside its outputs or in its cache;
    {} when it is missing, unreadable or not an object (a record only saves work: losing it is safe)."""
    try:
        found = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def user_cache_dir(name: str) -> Path:
    """$XDG_CACHE_HOME/fashion-visual-search/<name> (~/.cache when unset): what this tool keeps for
    later runs that no output folder owns (the int8 CPU graphs, URL working copies, YOLO exports,
    datasets' hashes)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fashion-visual-search" / name


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


class AtomicNpyMemmap:
    """A 2-D .npy file filled through memory-mapped row windows and moved into place only when
    complete. Each window is unmapped after it is written, so resident memory stays at one
    window however large the file (a single map of the whole file would keep every written page
    resident: 400 MB at 10,000 x 10,000 float32). A window is not flushed (msync) before it is
    unmapped: its pages stay in the page cache and reach the disk as any write does (an msync per
    window waited for the disk: 0.7 s of a 10,000-item run's 0.4 GB matrix on this VM).

    The file's blocks are allocated when it is made (posix_fallocate): a disk without room for it
    fails here, with a message, rather than when a mapped page is first written, which the kernel
    answers with SIGBUS, ending the process without a word.

    Use as a context manager; on an exception the temp file is removed and nothing appears at `path`.
    """

    def __init__(self, path: str | Path, shape: tuple[int, int], dtype: Any) -> None:
        self.path = Path(path)
        self.shape, self.dtype = shape, np.dtype(dtype)
        fd, self.tmp = temp_file_beside(self.path)
        os.close(fd)
        try:
            header = np.lib.format.open_memmap(self.tmp, mode="w+", dtype=self.dtype, shape=shape)
            self.offset = header.offset
            del header
            _allocate(self.tmp, self.offset + int(np.prod(shape)) * self.dtype.itemsize, self.path)
        except BaseException:
            unlink_quietly(self.tmp)
            raise

    def write_rows(self, start: int, block: np.ndarray) -> None:
        """Write rows [start, start + len(block)) through a temporary map of just those rows."""
        if block.shape[1:] != self.shape[1:]:
            raise ValueError(f"block shape {block.shape} does not fit {self.shape}")
        row_bytes = self.shape[1] * self.dtype.itemsize
        window = np.memmap(
            self.tmp, dtype=self.dtype, mode="r+", offset=self.offset + start * row_bytes, shape=block.shape
        )
        window[:] = block
        del window

    def __enter__(self) -> AtomicNpyMemmap:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            os.replace(self.tmp, self.path)
        else:
            unlink_quietly(self.tmp)


def _fallocate(fd: int, size: int) -> int | None:
    """Linux's fallocate(2) on `fd` for bytes [0, size): 0, or the errno it failed with; None where
    the call does not exist. Not os.posix_fallocate: where the file system cannot reserve (NFSv3,
    older ZFS, some FUSE), glibc emulates it by writing into every 4 KiB block, one round trip each
    over NFS."""
    import ctypes

    try:
        call = ctypes.CDLL(None, use_errno=True).fallocate64
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        return None
    call.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    call.restype = ctypes.c_int
    return 0 if call(fd, 0, 0, size) == 0 else ctypes.get_errno()


def _allocate(tmp: str | Path, size: int, target: Path) -> None:
    """Reserve `size` bytes of disk for the file at `tmp` (to become `target`); PipelineError when
    the disk has no room. Where the file system cannot reserve, its free space is compared with
    `size` instead."""
    fd = os.open(tmp, os.O_RDWR)
    try:
        err = _fallocate(fd, size)
        if err == 0:
            return
        if err not in (errno.ENOSPC, errno.EDQUOT):  # cannot reserve here: is there room at all?
            st = os.fstatvfs(fd)
            if size <= st.f_bavail * st.f_frsize:
                return
            err = errno.ENOSPC
        raise PipelineError(
            f"no room for {target.name} ({size / 1e9:.2f} GB) in {target.parent}: {os.strerror(err)}. Free some "
            f"space, or choose another folder."
        )
    finally:
        os.close(fd)


# The names tempfile.mkstemp gives the temp files above (prefix ".<name>.", 8 random characters,
# suffix ".tmp") and check_writable's probe. A process killed between mkstemp and os.replace
# leaves one behind; nothing else in an output folder is named like this.
_TEMP_LEFTOVER = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp|\.write-test\.[a-z0-9_]{8}")


def remove_temp_leftovers(folder: str | Path) -> int:
    """Delete the temp files a killed run left in `folder` (not recursive); returns how many.

    Only safe while no other run writes there: call it with the output folder's lock held.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    removed = 0
    for p in folder.iterdir():
        if _TEMP_LEFTOVER.fullmatch(p.name) and p.is_file() and not p.is_symlink():
            unlink_quietly(p)
            removed += 1
    return removed


def writer_of(folder: str | Path) -> str | None:
    """The pid of another live process whose OutputLock is on `folder` now, or None: a reader refused
    for a store caught between two of its files says that a run is writing it. Read from the lock
    file (a run removes it as it ends), not by taking the lock: a probe's brief lock would refuse a
    run starting at that instant; this process's own lock (a search holds its folder's) is none. The
    file holds the pid and, where the system says it, the process's start time: a SIGKILLed run's
    pid taken since by another process (after a container restart) is not that run."""
    try:
        pid_text, _, started = (Path(folder) / OutputLock.NAME).read_text().strip().partition(" ")
        pid = int(pid_text)
    except (OSError, ValueError):
        return None
    if pid == os.getpid():
        return None
    try:
        os.kill(pid, 0)  # alive (a SIGKILLed run's file stays; its pid is gone)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # alive, another user's
    now = process_start(pid)
    if started and now is not None and now != started:
        return None  # the pid of another process now
    return str(pid)


def process_start(pid: int) -> str | None:
    """When process `pid` started, in clock ticks since boot (Linux's /proc/PID/stat, field 22); None
    where that cannot be read (another system, or the process is gone)."""
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat_line[stat_line.rfind(")") + 2 :].split()  # after "pid (name) ": field 3 on
    return fields[19] if len(fields) > 19 else None


def being_written(folder: str | Path) -> str:
    """' (another run, pid N, is writing to FOLDER now: an update switching in, or a build; open it again
    once it ends)' where one holds the folder's lock, else ''."""
    pid = writer_of(folder)
    return (f"; another run (pid {pid}) is writing to {folder} now (an update switching its store in, or a build): "
            "open it again once that run ends") if pid else ""


class OutputLock:
    """An exclusive lock on an output folder for the length of a run.

    Two runs writing the same images/ and embeddings/ would interleave shards and overwrite each
    other's files, so the second is refused. The lock is an flock on <folder>/.pipeline.lock: the
    kernel drops it when the process ends, however it ends, so a killed run never leaves a stale
    lock behind. Where fcntl does not exist (Windows) no lock is taken.
    """

    NAME = ".pipeline.lock"

    def __init__(self, folder: str | Path, flag: str = "--output-dir") -> None:
        self.path = Path(folder) / self.NAME
        self.flag = flag  # what chose the folder, named when it cannot be written
        self.fd: int | None = None

    def __enter__(self) -> OutputLock:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            return self
        check_writable(self.path.parent, self.flag)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                said = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
                pid = said.split(" ")[0]  # "pid start-time" (writer_of)
                holder = pid if pid.isdigit() else said or "unknown"
                os.close(fd)
                raise PipelineError(
                    f"another run (pid {holder}) is writing to {self.path.parent}; wait for it to end or choose "
                    f"another --output-dir"
                ) from None
            try:  # a failed run removes its lock file (__exit__): a lock on a file no longer there counts for nothing
                if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {process_start(os.getpid()) or ''}".strip().encode("ascii") + b"\n", 0)
        except OSError as e:  # a full disk: the lock is let go, not kept by a descriptor nobody closes
            os.close(fd)
            raise PipelineError(f"cannot write the lock file {self.path}: {e.strerror or e}") from e
        self.fd = fd
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.fd is not None:
            if exc_type is not None and os.listdir(self.path.parent) == [self.NAME]:
                unlink_quietly(self.path)  # a run that failed before writing anything leaves nothing
            try:
                os.ftruncate(self.fd, 0)  # no pid left behind: writer_of reads none once the run ended
            except OSError:
                pass
            os.close(self.fd)  # closing the descriptor releases the flock
            self.fd = None


@contextmanager
def waiting_lock(path: str | Path, waiting: Callable[[], None] | None = None) -> Iterator[None]:
    """An exclusive flock on the file at `path` for a short step, waited for when another process
    (or another descriptor of this one) holds it; `waiting` is called once before such a wait. The
    file is removed when the step ends, before the flock is let go: a waiter that then holds a
    lock on a file no longer there (or replaced) starts again on the file at `path`, as
    OutputLock's does. Where fcntl does not exist (Windows) no lock is taken."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    told = False
    no_flock: OSError | None = None
    while True:
        fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o644)  # flock needs no write access
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if waiting is not None and not told:
                    waiting()
                    told = True
                fcntl.flock(fd, fcntl.LOCK_EX)
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:  # removed by the holder we waited for: start again on the new file
            pass
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP):
                raise
            no_flock = e  # a file system without flock: as on Windows, said once
            break
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    if no_flock is not None:
        log.warning("%s: no file locks on this file system (%s); going on without one", path, no_flock.strerror)
        unlink_quietly(path)
        yield
        return
    try:
        yield
    finally:
        unlink_quietly(path)
        os.close(fd)  # closing the descriptor releases the flock


@contextmanager
def removed_if_left_empty(folders: Sequence[Path]) -> Iterator[None]:
    """On a failure, remove those of `folders` (and of their parents) that did not exist before and
    are still empty, deepest first, so a run that failed early leaves no empty folders behind."""
    missing: set[Path] = set()
    for p in map(Path, folders):
        while not p.exists() and p != p.parent:
            missing.add(p)
            p = p.parent
    new = sorted(missing, key=lambda p: len(p.absolute().parts), reverse=True)
    try:
        yield
    except BaseException:
        for p in new:
            try:
                p.rmdir()
            except OSError:  # not empty, or never made
                pass
        raise


ABANDONED_AFTER_S = 24 * 3600  # a work folder untouched this long was left by a killed run


def remove_abandoned(folder: Path, pattern: str, what: str = "an interrupted export") -> None:
    """Remove the work folders matching `pattern` in `folder` that killed runs left (gigabytes for a
    large model); one whose entries changed in the last day may be another run's, working now."""
    now = time.time()
    for old in folder.glob(pattern):
        try:
            if old.is_dir() and not old.is_symlink() and now - old.stat().st_mtime > ABANDONED_AFTER_S:
                log.warning("removing %s, left by %s", old, what)
                shutil.rmtree(old, ignore_errors=True)
        except OSError:
            pass


def unlink_quietly(path: str | Path) -> None:
    """Remove a file if it is there."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def link_or_copy(src: Path, dst: Path) -> None:
    """`dst` as a hard link to `src` (no second copy on disk), or a copy where the file system has
    no links or `dst` is on another one; whatever was at `dst` is replaced."""
    unlink_quietly(dst)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def read_regular_file(path: str | Path) -> bytes:
    """A file's bytes. A pipe, socket or device named like a picture is refused with an OSError
    saying so, not read (a pipe's read would wait forever): opened without blocking, then judged."""
    with open(path, "rb", opener=lambda p, flags: os.open(p, flags | os.O_NONBLOCK)) as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise OSError(errno.EINVAL, "not a regular file (a pipe, socket or device)", str(path))
        return f.read()


def printable_name(name: str) -> str:
    """A file name as it can be written (CSV, JSON, the terminal): each byte of a name that is not
    UTF-8 (which os.fsdecode keeps as a lone surrogate, refused by every UTF-8 writer) shown as %XX,
    so that two such names stay apart (a backslash escape would read as a Windows folder)."""
    if name.isascii() or not any("\udc80" <= ch <= "\udcff" for ch in name):
        return name
    return "".join(f"%{ord(ch) - 0xDC00:02X}" if "\udc80" <= ch <= "\udcff" else ch for ch in name)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_file_once(path: str | Path) -> str:
    """sha256_file, computed once per version of the file (its size and modification time) in this
    process (its inode too: a file replaced by another of the same size within a clock tick is
    not taken for it): for a file several steps of a run ask about (weights, an ONNX file)."""
    return _sha256_of(*file_version(path))


def file_version(path: str | Path) -> tuple[str, int, int, int]:
    """(resolved path, inode, modification time in ns, size): what a cache of a file's contents is
    keyed by, so that a file replaced or rewritten is read again."""
    p = Path(path)
    st = p.stat()
    return str(p.resolve()), st.st_ino, st.st_mtime_ns, st.st_size


@functools.lru_cache(maxsize=8)
def _sha256_of(path: str, inode: int, mtime_ns: int, size: int) -> str:
    return sha256_file(path)


def sha256_bytes(data: bytes | bytearray | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def atomic_write_npy_chunks(path: str | Path, shape: tuple[int, ...], dtype: Any, chunks: Iterable[np.ndarray]) -> str:
    """Write an .npy file from consecutive chunks along axis 0, atomically, holding one chunk at a
    time. Returns the file's sha256, computed while writing: a chunk of 1 MiB or more is hashed by
    a second thread while this one writes it (both let go of the GIL), and is done with before the
    next is asked for."""
    from concurrent.futures import ThreadPoolExecutor

    path = Path(path)
    fd, tmp = temp_file_beside(path)
    h = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as f, ThreadPoolExecutor(max_workers=1, thread_name_prefix="hash") as hasher:

            def put(data: bytes | memoryview) -> None:
                if len(data) < 1 << 20:
                    f.write(data)
                    h.update(data)
                    return
                hashed = hasher.submit(h.update, data)
                try:
                    f.write(data)
                finally:
                    hashed.result()

            header = io.BytesIO()
            np.lib.format.write_array_header_1_0(
                header, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape}
            )
            put(header.getvalue())
            written = 0
            for chunk in chunks:
                chunk = np.ascontiguousarray(chunk, dtype=dtype)
                if chunk.shape[1:] != shape[1:]:
                    raise ValueError(f"chunk shape {chunk.shape} does not fit {shape}")
                if chunk.size:
                    put(chunk.data.cast("B"))  # no copy
                written += chunk.shape[0]
            if written != shape[0]:
                raise ValueError(f"{path.name}: wrote {written} rows, expected {shape[0]}")
        os.replace(tmp, path)
    except BaseException:
        unlink_quietly(tmp)
        raise
    return h.hexdigest()


def check_writable(path: str | Path, flag: str = "--output-dir", remedy: str = "") -> None:
    """Create `path` if needed and prove a file can be written there; PipelineError otherwise,
    saying to choose another with `flag` (or what `remedy` says)."""
    path = Path(path)
    blocking = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
    if blocking is not None:  # "not writable: File exists" said nothing of the file in the way
        where = "is a file" if blocking == path else f"is under {blocking}, a file"
        raise PipelineError(f"output folder {path} {where}, not a folder. {remedy or f'Choose a folder with {flag}.'}")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".write-test.", dir=path)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise PipelineError(
            f"output folder {path} is not writable: {e.strerror or e}. {remedy or f'Choose another with {flag}.'}"
        ) from e


@contextmanager
def stops_held() -> Iterator[None]:
    """Ctrl-C and SIGTERM held back while a few file moves that must not be cut in two run (a clip's
    results put in place of the last ones, and the report section naming them), then taken as they
    would have been: a KeyboardInterrupt (main.py's SIGTERM handler raises its own) once the moves
    are done. Off the main thread, where Python takes no signal, nothing is held."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    came: list[signal.Signals] = []
    held = {s: signal.signal(s, lambda signum, frame: came.append(signal.Signals(signum)))
            for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in held.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)  # None: one set outside Python
    came = [s for s in came if held[s] is not signal.SIG_IGN]  # a signal the process ignores stays ignored
    if came:
        log.debug("a stop (signal %d) was held until the moves finished", came[0])
        handler = held[came[0]]
        if callable(handler) and handler is not signal.default_int_handler:
            handler(came[0], None)  # main.py's SIGTERM handler: its own exception, exit 143
        raise KeyboardInterrupt
