"""--output-dir as an fsspec URL (s3://bucket/run, gs://..., any filesystem fsspec knows): the run
works in a local working copy and the URL holds the outputs.

Before a run, what it reads is fetched from the URL: the stores (embeddings/, embeddings_segment/,
their shards of an unfinished run, so a run resumes from wherever the last one got to) and the
report (outputs/). Images and result pictures are never fetched. After the run, and after a
failed or interrupted one, every file of the working copy that is new or changed since it was last
fetched or sent is uploaded, so the URL is never behind the working copy by more than one run.
With `--engine ray`, workers write the images straight to the URL: the nodes need no shared
filesystem.

The working copy is --work-dir, by default a folder per URL under ~/.cache/fashion-visual-search.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import PipelineError, UsageError
from .fileio import atomic_write_text, read_json_dict, user_cache_dir

log = logging.getLogger(__name__)

URL = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://(.+)$")
SYNC_FILE = ".remote-sync.json"  # in the working copy: {relative path: [size, mtime_ns]} as last fetched or sent
COPY_OF_FILE = ".remote-of"  # in the working copy: the URL it is the copy of (its files' sync state is that URL's)
FETCHED = ("embeddings", "embeddings_segment", "outputs")  # what a run may read back
# Never sent: the lock, the sync state, temp files, and the neighbour lists a run keeps for the next
# run in this working copy (runner.NEIGHBOURS_FILE: 120 MB at a million items, read back by no one else).
SKIPPED = re.compile(r"(^|/)(\.pipeline\.lock|\.remote-sync\.json|\.remote-of|[^/]*\.tmp[^/]*|\.neighbours[^/]*\.npz)$")
# Sent after everything else: a store's sidecar names the files it describes by their hashes, so a
# reader of the URL finds it only once they are there (store.SIDECAR_FILE; remote.py knows no store).
SENT_LAST = re.compile(r"(^|/)embeddings\.json$")


def is_url(text: str | os.PathLike | None) -> bool:
    """An fsspec URL other than file:// (a local path stays a path)."""
    m = URL.match(str(text or ""))
    return m is not None and m.group(1).lower() not in ("file", "local")


def default_work_dir(url: str) -> Path:
    """~/.cache/fashion-visual-search/outputs/<bucket-and-path>-<hash>: one working copy per URL,
    with or without its trailing slash (s3://b/run/ is s3://b/run: another copy left what one had
    not sent yet unsent for good)."""
    url = url.rstrip("/")
    m = URL.match(url)
    if m is None:
        raise ValueError(f"default_work_dir needs a URL such as s3://bucket/run, got {url!r}")
    base = user_cache_dir("outputs")
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", m.group(2)).strip("-")[:60]
    return base / f"{slug}-{hashlib.sha256(url.encode()).hexdigest()[:8]}"


def filesystem(url: str) -> tuple[Any, str]:
    """(fsspec filesystem, root path without the protocol) for url; UsageError when its package is
    missing (s3fs for s3://, gcsfs for gs://, ...)."""
    try:
        import fsspec
    except ImportError as e:
        raise UsageError(f"--output-dir {url} needs fsspec: pip install fsspec") from e
    try:
        fs, root = fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as e:
        raise UsageError(f"--output-dir {url}: {e}") from e
    return fs, root.rstrip("/")


def url_writer(url: str) -> Callable[[str, bytes], None]:
    """write(name, data): one file under url, its filesystem resolved once (an object store's put is
    all or nothing: no temp file needed)."""
    fs, root = filesystem(url)
    return lambda name, data: fs.pipe_file(f"{root}/{name}", data)


def list_names(url: str) -> set[str]:
    """The paths of the files under url, relative to it (empty when there is nothing)."""
    fs, root = filesystem(url)
    fs.invalidate_cache(root)  # other processes (Ray workers) write there too
    try:
        return {p[len(root) :].lstrip("/") for p in fs.find(root)}
    except FileNotFoundError:
        return set()


def images_there(url: str, work_dir: Path, folder: Path) -> set[str]:
    """The image files a store at `url` may count on: those listed there, and those of the working
    copy's `folder` that a run wrote and has not sent yet (an upload that failed: the next run sends
    them, and its check of the store found them "missing from" the URL, a damaged store to rebuild)."""
    names = list_names(url)
    if folder.is_dir():
        state = read_json_dict(work_dir / SYNC_FILE)
        with os.scandir(folder) as entries:  # only the names the URL lacks are looked at (1M photos: 1M stats)
            for entry in entries:
                if entry.name in names or SKIPPED.search(entry.name) or not entry.is_file():
                    continue
                rel = f"{folder.relative_to(work_dir).as_posix()}/{entry.name}"
                if (state.get(rel) or [])[:2] != _stamp(entry.stat()):
                    names.add(entry.name)
    return names


def remove_stale_at_url(url: str, owned: re.Pattern, keep: set[str]) -> int:
    """Delete the files directly under url that this tool names (owned) and keep does not list."""
    fs, root = filesystem(url)
    stale = [f"{root}/{name}" for name in list_names(url) if "/" not in name and owned.fullmatch(name)]
    stale = [p for p in stale if p.rsplit("/", 1)[1] not in keep]
    if stale:
        fs.rm(stale)
    return len(stale)


class RemoteOutput:
    """The URL and its working copy."""

    def __init__(self, url: str, work_dir: Path) -> None:
        self.url, self.work_dir = url.rstrip("/"), Path(work_dir)
        self.fs, self.root = filesystem(self.url)
        self.sent = 0
        self.removed = 0  # files the runs removed from the URL (a store's finished shards, pictures gone)
        self.send_all = False  # a working copy whose record of what was sent may be another URL's

    def _state(self) -> dict[str, list[Any]]:
        """Per file of the working copy: [size, mtime_ns, the URL's version of it] when it was last
        fetched or sent (the version: the object's ETag, else its modification time)."""
        return read_json_dict(self.work_dir / SYNC_FILE)

    def _save_state(self, state: dict[str, list[Any]]) -> None:
        atomic_write_text(self.work_dir / SYNC_FILE, json.dumps(state, sort_keys=True))

    def check_access(self, write: bool = True) -> None:
        """Fail before any work when the URL cannot be listed or (`write`) written."""
        if not write:  # a mode that only reads: a serving node's read-only credentials are enough
            try:
                self.fs.ls(self.root, detail=False)
            except FileNotFoundError:
                pass  # nothing there yet: the run says what it misses
            except Exception as e:  # credentials, bucket, network
                raise PipelineError(f"--output-dir {self.url} cannot be read: {type(e).__name__}: {e}") from e
            return
        probe = f"{self.root}/.fashion-write-check"
        try:
            self.fs.pipe_file(probe, b"ok")
            self.fs.rm_file(probe)
        except Exception as e:  # every filesystem has its own errors: credentials, bucket, network
            raise PipelineError(f"--output-dir {self.url} cannot be written: {type(e).__name__}: {e}") from e

    def claim(self) -> None:
        """Make the working copy this URL's, or refuse one that is another URL's: its record of what
        was sent is that URL's, so files unchanged since would never reach this one (a --work-dir
        reused for another URL left the new bucket without them, said sent)."""
        self.work_dir.mkdir(parents=True, exist_ok=True)
        mark = self.work_dir / COPY_OF_FILE
        try:
            of = mark.read_text(encoding="utf-8").strip()
        except OSError:
            of = ""
        if of and of != self.url:
            raise UsageError(f"--work-dir {self.work_dir} is the working copy of {of}, not of {self.url}: give "
                             "another --work-dir (or leave it out: each URL gets its own), or delete that folder")
        if not of:
            if (self.work_dir / SYNC_FILE).is_file():  # a copy made before copies were marked: whose is unknown,
                self.send_all = True  # so every file of it is sent after this run, once (what it fetched stays)
                log.info("%s: a working copy that names no URL: every file of it is sent to %s after this run",
                         self.work_dir, self.url)
            atomic_write_text(mark, self.url + "\n")

    def fetch(self) -> int:
        """Download the stores and the report the URL has and the working copy lacks or holds an
        older version of (another size where the URL gives no version); returns the number fetched."""
        self.claim()
        self.fs.invalidate_cache()  # listings another process's writes made stale
        state, fetched = self._state(), 0
        for rel, path, info in self._listed(FETCHED):
            if info.get("type") == "directory" or SKIPPED.search(rel):
                continue
            local = self.work_dir / rel
            # the same size is not the same file: another machine's --update rewrites a store's files,
            # most of them at their size. The URL's version of it when last synced says whether it changed
            # since (if not, the copy's own is kept: a change not yet sent is sent after the run)
            known, version = state.get(rel) or [], remote_version(info)
            if local.is_file():
                if version is None:  # a filesystem that gives no version: by size, as before
                    if local.stat().st_size == info.get("size"):
                        continue
                elif len(known) == 3 and known[2] == version:
                    continue  # a copy synced before versions were recorded fetches each file once
            local.parent.mkdir(parents=True, exist_ok=True)
            tmp = local.with_name(local.name + ".tmp-fetch")
            self.fs.get_file(path, str(tmp))
            os.replace(tmp, local)
            state[rel] = [*_stamp(local.stat()), version]
            fetched += 1
        self._save_state(state)
        return fetched

    def changed(self) -> Iterator[tuple[str, os.stat_result]]:
        state = self._state()
        for local in sorted(self.work_dir.rglob("*")):
            rel = local.relative_to(self.work_dir).as_posix()
            if not local.is_file() or local.is_symlink() or SKIPPED.search(rel):
                continue
            st = local.stat()
            if self.send_all or (state.get(rel) or [])[:2] != _stamp(st):
                yield rel, st

    def send(self) -> int:
        """Upload every file new or changed since it was last fetched or sent, and remove from the
        URL the files of a store folder the run removed (its finished shards); returns the count sent."""
        state, sent = self._state(), 0
        changed = sorted(self.changed(), key=lambda c: c[0])
        last = [(rel, st) for rel, st in changed if SENT_LAST.search(rel)]
        for rel, st in [c for c in changed if not SENT_LAST.search(c[0])]:
            state[rel] = self._put(rel, st)
            sent += 1
        # Files the run removed go before the sidecars: a store's sidecar reaches the URL only once the files it
        # no longer lists (a thumbnails segment that held a removed photo) are gone from there.
        # Every file this copy fetched or sent and the run removed: a store's finished shards, result pictures of
        # photos gone or past --max-result-images, earlier queries' pictures (as a local run removes them)
        for rel in [r for r in state if not (self.work_dir / r).is_file()]:
            try:
                self.fs.rm_file(f"{self.root}/{rel}")
                self.removed += 1
            except FileNotFoundError:
                pass
            del state[rel]
        for rel, st in last:
            state[rel] = self._put(rel, st)
            sent += 1
        self._record_versions(state, {rel for rel, _ in changed})
        self._save_state(state)
        self.send_all = False
        self.sent += sent
        return sent

    def _put(self, rel: str, st: os.stat_result) -> list[Any]:
        """Send one file; its state line (its version at the URL: _record_versions)."""
        self.fs.put_file(str(self.work_dir / rel), f"{self.root}/{rel}")
        return [*_stamp(st), None]

    def _record_versions(self, state: dict[str, list[Any]], sent: set[str]) -> None:
        """The URL's version of each file sent that the next run fetches (under FETCHED), read from
        the same listing fetch compares with (one per folder; a HEAD's form may differ from it)."""
        tops = {rel.split("/", 1)[0] for rel in sent} & set(FETCHED)
        if not tops:
            return
        self.fs.invalidate_cache()
        for rel, _, info in self._listed(sorted(tops)):
            if rel in state and rel in sent:
                state[rel][2] = remote_version(info)

    def _listed(self, tops: Iterable[str]) -> Iterator[tuple[str, str, dict[str, Any]]]:
        """(path relative to the root, full path, fsspec's info) of everything at the URL under `tops`."""
        for top in tops:
            base = f"{self.root}/{top}"
            try:
                found = self.fs.find(base, detail=True)
            except FileNotFoundError:
                continue
            for path, info in found.items():
                yield f"{top}/{path[len(base):].lstrip('/')}", path, info


def _stamp(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns]


def remote_version(info: dict[str, Any]) -> str | None:
    """What says an object at the URL changed, from fsspec's info: its ETag (S3, GCS), else its
    modification time; None when the filesystem gives neither."""
    for key in ("ETag", "etag", "md5Hash", "LastModified", "mtime", "updated", "last_modified", "created"):
        if info.get(key) is not None:
            return str(info[key])
    return None


@contextmanager
def mirrored(url: str, work_dir: Path, resend: str = "run the same command again to send them",
             sends: bool = True) -> Iterator[RemoteOutput]:
    """Fetch before the run; send after it, whether it finished, failed or was interrupted. When
    the upload fails too, the run's own error is the one raised and the upload's is logged.
    resend: how to send what an upload that failed left (a build's: with its cache flag, not again).
    sends: False for a mode that only reads the URL (--serve, --export): nothing is sent (a stale
    file of this copy's sent over another machine's newer one) and read access is enough."""
    remote = RemoteOutput(url, work_dir)
    remote.check_access(write=sends)
    n = remote.fetch()
    if n:
        log.info("fetched %d file(s) from %s into %s", n, url, work_dir)
    if not sends:
        yield remote
        return
    failed = True
    try:
        yield remote
        failed = False
    finally:
        try:
            n = remote.send()
            log.info("sent %d file(s) to %s", n, url)
        except Exception as e:
            how = "run the same command again to send them" if failed else resend  # a run that failed: resume it
            message = f"uploading to {url} failed ({type(e).__name__}: {e}); the outputs are in {work_dir}: {how}"
            if failed:
                log.error(message)
            else:
                raise PipelineError(message) from e
