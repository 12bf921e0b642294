"""Helpers the test modules share (fixtures live in conftest.py)."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

import main as cli
from pipeline.store import ShardStore


@contextmanager
def another_run_holding(folder: Path) -> Iterator[int]:
    """Another process holding `folder`'s OutputLock (as a build or update does) until the block
    ends; yields its pid."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pipeline.fileio import OutputLock\n"
         "with OutputLock(sys.argv[1]):\n    print('held', flush=True); time.sleep(60)", str(folder)],
        cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        yield holder.pid
    finally:
        holder.kill()
        holder.wait()


def run(*args) -> int:
    """main.py with these arguments (paths allowed) and -q; its exit code."""
    return cli.main([*map(str, args), "-q"])


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_after_shards(monkeypatch: pytest.MonkeyPatch, n: int) -> list[int]:
    """Interrupt a run (as Ctrl-C would) right after its n-th shard is written, by either engine.
    Returns the list the numbers of the written shards are appended to; monkeypatch.undo() ends it."""
    real, written = ShardStore.write, []

    def write_then_stop(self, shard):
        real(self, shard)
        written.append(shard.number)
        if len(written) == n:
            raise KeyboardInterrupt

    monkeypatch.setattr(ShardStore, "write", write_then_stop)
    return written


def edit_csv_lines(path: Path, edit: Callable[[list[dict[str, str]]], object]) -> str:
    """A manifest-like CSV's lines changed in place by edit(lines) (a list of dicts, header kept);
    returns the sha256 of the file written, for the record that vouches for it."""
    import csv
    import hashlib

    with open(path, newline="") as f:
        lines = list(csv.DictReader(f))
    edit(lines)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(lines[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(lines)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def signed_earlier_shard(partial: Path, number: int) -> int:
    """Rewrite a completed shard of an unfinished run (<store>/.partial) as a run of the signature
    before this one left it: each look written as `look-3:...` and its pixel hash blanked (both come
    back only if signed again), the shard's .done hashes made to match (still complete). Returns how
    many lines it rewrote."""
    import json

    path, done_path = partial / f"shard_{number:05d}.csv", partial / f"shard_{number:05d}.done"
    signed = []

    def as_look_3(lines: list[dict[str, str]]) -> None:
        for line in lines:
            if line["look"]:
                line["look"] = "look-3:" + line["look"].split(":", 1)[1]
                line["pixel_hash"] = ""
                signed.append(line)

    sha256 = edit_csv_lines(path, as_look_3)
    done = json.loads(done_path.read_text())
    done["rows"] = sha256
    done_path.write_text(json.dumps(done))
    return len(signed)


def assert_same_up_to_rounding(a, b, q, g, tol=1e-5):
    """Two top-k results (retrieval.Neighbours of queries q over gallery g) are the same search: equal
    distances, and the same items except where items' distances differ by float rounding only. BLAS
    and FAISS kernels may round the products of identical vectors differently (OpenBLAS on AVX2-only
    EPYCs does), so ties among copies need not come in index order there."""
    assert np.allclose(a.distances, b.distances, atol=tol)
    assert np.array_equal(a.indices < 0, b.indices < 0)  # the same empty slots
    differ = a.indices != b.indices
    true_a = 1.0 - np.einsum("qd,qkd->qk", q, g[a.indices])
    assert np.allclose(true_a[differ], b.distances[differ], atol=tol)
    assert all(len(set(r[r >= 0])) == int((r >= 0).sum()) for r in a.indices)  # no item twice


def file_of(out, source_row: int, store: str = "embeddings") -> str:
    """The image file of a dataset row in the run at `out`, read from its manifest (file names carry
    the picture's content, never its row)."""
    from pathlib import Path

    from pipeline.store import read_manifest

    files = [r.file for r in read_manifest(Path(out) / store / "manifest.csv") if r.source_row == source_row and r.file]
    assert files, f"row {source_row} has no file in {out}"
    return files[0]


def row_files(out, store: str = "embeddings") -> dict[int, str]:
    """Dataset row -> its image file (the first line's, for a segmented store), from the run's manifest."""
    from pathlib import Path

    from pipeline.store import read_manifest

    found: dict[int, str] = {}
    for r in read_manifest(Path(out) / store / "manifest.csv"):
        if r.file:
            found.setdefault(r.source_row, r.file)
    return found


def thumbnails(store_dir) -> np.ndarray:
    """Every thumbnail of the store at `store_dir`, in embedding-row order (thumbnails.npy and the
    segments updates appended, as the sidecar lists them)."""
    from pipeline.store import ThumbnailReader

    reader = ThumbnailReader.of(store_dir)
    try:
        return reader.read_into(0, np.empty(reader.shape, np.uint8))
    finally:
        reader.close()


def store_file_names(sidecar_json: bytes | str) -> list[str]:
    """The files of a store, from its sidecar's text: manifest, vectors, every thumbnails file, sidecar."""
    import json

    data = json.loads(sidecar_json)
    return ["manifest.csv", "embeddings.npy", "thumbnails.npy",
            *(part["file"] for part in data.get("thumbnail_segments", [])), "embeddings.json"]


def float_graph_file(folder: Path, name: str, nodes: list, inits: list) -> Path:
    """A tiny float image graph (input x: (b, 4, 8, 8), output the last node's) saved as the fp32
    twin of `<folder>/<name>_image_int8_static.onnx`, which is returned (not written): for the
    export's and the benchmarks' choice of a static graph by the tower (int8graph.static_graph)."""
    import onnx
    from onnx import TensorProto, helper
    from pipeline.export import fp32_path_for

    graph = helper.make_graph(nodes, name, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 4, 8, 8])],
                              [helper.make_tensor_value_info(nodes[-1].output[0], TensorProto.FLOAT, None)], inits)
    path = folder / f"{name}_image_int8_static.onnx"
    onnx.save(helper.make_model(graph), str(fp32_path_for(path)))
    return path
