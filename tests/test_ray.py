"""--engine ray on one 2-core machine: the same store as the local engine, rows out of order, a killed
run resumed, a cluster joined by address, and Ray optional. One Ray instance serves the in-process
tests; the address test starts (and stops) its own head on 127.0.0.1."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import main as cli
from pipeline import ray_engine
from pipeline.dataset import Piece
from pipeline.store import read_manifest
from tests import assets
from tests.conftest import mixed_cells
from tests.helpers import free_port, signed_earlier_shard, stop_after_shards, store_file_names

ROOT = Path(__file__).resolve().parents[1]
ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def ray_instance(request):
    import logging

    try:  # the workers reach the S3 stand-in too, when it runs here
        s3_env = request.getfixturevalue("s3")[1]
    except pytest.skip.Exception:
        s3_env = {}
    ray.init(
        address="local",  # not a cluster `ray start` left on this machine
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=300 << 20,
        logging_level=logging.WARNING,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), **s3_env}},
    )
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def ragged(tmp_path_factory):
    """60 rows over two parquet files of row groups of 7 (pieces cross shard edges), failures included."""
    folder = tmp_path_factory.mktemp("ragged") / "ds"
    cells = [c for _, c in mixed_cells()] + [assets.encode(assets.rgb_image(30, 40, seed=i), "PNG") for i in range(36)]
    import pyarrow as pa
    import pyarrow.parquet as pq

    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    (folder / "data").mkdir(parents=True)
    for k, part in enumerate((cells[:33], cells[33:])):
        rows = [None if c is None else {"bytes": c, "path": None} for c in part]
        pq.write_table(
            pa.table({"image": pa.array(rows, type=image)}),
            folder / "data" / f"train-{k:05d}-of-00002.parquet",
            row_group_size=7,
        )
    return folder


def _args(ds, onnx, out, *extra):
    return [
        "--dataset",
        str(ds),
        "--onnx",
        str(onnx),
        "--output-dir",
        str(out),
        "--shard-rows",
        "16",
        "--batch-size",
        "4",
        "--max-result-images",
        "0",
        "-q",
        *extra,
    ]


@pytest.fixture(scope="module")
def local_run(ragged, tiny_onnx, tmp_path_factory):
    out = tmp_path_factory.mktemp("local")
    assert cli.main(_args(ragged, tiny_onnx, out)) == 3
    return out


def _same_store(a: Path, b: Path) -> None:
    assert (a / "embeddings" / "manifest.csv").read_bytes() == (b / "embeddings" / "manifest.csv").read_bytes()
    ea, eb = np.load(a / "embeddings" / "embeddings.npy"), np.load(b / "embeddings" / "embeddings.npy")
    assert ea.shape == eb.shape and np.abs(ea - eb).max() <= 1e-6
    assert np.array_equal(np.load(a / "embeddings" / "thumbnails.npy"), np.load(b / "embeddings" / "thumbnails.npy"))
    assert sorted(p.name for p in (a / "images").iterdir()) == sorted(p.name for p in (b / "images").iterdir())


@pytest.mark.parametrize("layout", ["lanes", "split"])
def test_ray_builds_the_local_store_with_rows_out_of_order(
    layout, ray_instance, ragged, tiny_onnx, local_run, tmp_path, monkeypatch
):
    # lanes: CPU actors make and embed items; split: item tasks feed an embedding actor pool (the GPU layout)
    arrived = []
    real = ray_engine.Collector.add

    def add(self, batch, shard_rows):
        arrived.extend(int(r) for r in batch["source_row"])
        return real(self, batch, shard_rows)

    monkeypatch.setattr(ray_engine.Collector, "add", add)
    # pieces handed to Ray last first, so rows arrive out of order however the actors are scheduled
    # (one actor started late takes its pieces in the order given)
    plan = ray_engine.plan_pieces
    monkeypatch.setattr(ray_engine, "plan_pieces", lambda spec: plan(spec)[::-1])
    monkeypatch.setattr(ray_engine, "split_layout", lambda gpus: layout == "split")
    out = tmp_path / "ray"
    assert cli.main(_args(ragged, tiny_onnx, out, "--engine", "ray")) == 3
    assert ray.is_initialized()  # a Ray the caller started is left to it
    assert sorted(arrived) == list(range(60)) and arrived != sorted(arrived)  # every row once, out of order
    _same_store(local_run, out)
    rows = read_manifest(out / "embeddings" / "manifest.csv")
    assert [r.source_row for r in rows if r.status == "failed"] == [2, 9]  # recorded, not dropped
    side = json.loads((out / "embeddings" / "embeddings.json").read_text())
    assert side["identity"]["backend"] == "onnx" and side["count"] == 58


def test_ray_workers_resize_with_the_resizer_the_run_chose(ray_instance, ragged, tiny_onnx, local_run, tmp_path):
    """--decode cpu-simd (torch's resize) on Ray: the workers make the local engine's pixels, and the
    store records them; a guard that the two resizers give other vectors here."""
    local, on_ray = tmp_path / "local", tmp_path / "ray"
    assert cli.main(_args(ragged, tiny_onnx, local, "--decode", "cpu-simd")) == 3
    assert cli.main(_args(ragged, tiny_onnx, on_ray, "--decode", "cpu-simd", "--engine", "ray")) == 3
    _same_store(local, on_ray)
    assert json.loads((on_ray / "embeddings" / "embeddings.json").read_text())["identity"]["pixels"] == "pil+torch"
    assert not np.array_equal(np.load(local / "embeddings" / "embeddings.npy"),
                              np.load(local_run / "embeddings" / "embeddings.npy"))


def test_ray_workers_embed_on_the_runtime_the_run_chose(ray_instance, ragged, tiny_onnx, tmp_path):
    """--onnx-runtime openvino on Ray: each worker runs the file on OpenVINO, and the store is the local
    engine's OpenVINO store, recording the runtime."""
    pytest.importorskip("openvino")
    local, on_ray = tmp_path / "local", tmp_path / "ray"
    assert cli.main(_args(ragged, tiny_onnx, local, "--onnx-runtime", "openvino")) == 3
    assert cli.main(_args(ragged, tiny_onnx, on_ray, "--onnx-runtime", "openvino", "--engine", "ray")) == 3
    _same_store(local, on_ray)
    assert json.loads((on_ray / "embeddings" / "embeddings.json").read_text())["identity"]["runtime"] == "openvino"


def test_a_killed_ray_run_resumes_each_row_once(
    ray_instance, ragged, tiny_onnx, local_run, tmp_path, monkeypatch, capsys
):
    """...and a shard its run left signed by an earlier duplicate signature is signed again from its
    files (the workers wrote them), so the store is the local run's all the same."""
    from pipeline.duplicates import SIGNATURE_VERSION

    out = tmp_path / "ray"
    stop_after_shards(monkeypatch, 2)
    assert cli.main(_args(ragged, tiny_onnx, out, "--engine", "ray")) == 130
    monkeypatch.undo()
    partial = out / "embeddings" / ".partial"
    rewritten = sum(signed_earlier_shard(partial, int(p.stem.split("_")[1])) for p in partial.glob("shard_*.done"))
    capsys.readouterr()
    assert cli.main([a for a in _args(ragged, tiny_onnx, out, "--engine", "ray") if a != "-q"]) == 3
    said = capsys.readouterr().out
    assert "resumed: 32 of 60 row(s) already done (2 of 4 shard(s) complete)" in said
    # this run's work and the stopped run's counted apart, as the local engine counts them (Ray said all as its own)
    counts = next(line for line in said.splitlines() if "embedded" in line)
    now, before = (int(re.search(rf"{what} (\d+)", counts).group(1))
                   for what in ("embedded", "embedded before the stop"))
    assert now + before == len(np.load(out / "embeddings" / "embeddings.npy")) and before > 0, counts
    assert f"duplicates: {rewritten} line(s) of the resumed shards signed again ({SIGNATURE_VERSION}" in said
    _same_store(local_run, out)
    assert [r.source_row for r in read_manifest(out / "embeddings" / "manifest.csv")] == list(range(60))


def test_ray_workers_write_the_images_to_a_bucket_and_the_driver_the_store(
    ray_instance, s3, ragged, tiny_onnx, local_run, tmp_path
):
    import io

    fs, _ = s3
    url, copy = f"s3://bucket/{secrets.token_hex(4)}/ray", tmp_path / "copy"
    assert cli.main([*_args(ragged, tiny_onnx, url, "--engine", "ray"), "--work-dir", str(copy)]) == 3
    root = url.removeprefix("s3://")
    fs.invalidate_cache()
    images = sorted(p.rsplit("/", 1)[1] for p in fs.find(f"{root}/images"))
    assert images == sorted(p.name for p in (local_run / "images").iterdir())
    assert not (copy / "images").exists()  # written by the workers straight to the bucket, not by the driver
    manifest = fs.cat_file(f"{root}/embeddings/manifest.csv")
    assert manifest == (local_run / "embeddings" / "manifest.csv").read_bytes()
    emb = np.load(io.BytesIO(fs.cat_file(f"{root}/embeddings/embeddings.npy")))
    assert np.abs(emb - np.load(local_run / "embeddings" / "embeddings.npy")).max() <= 1e-6


def test_an_update_on_ray_at_a_url_equals_a_fresh_local_build(ray_instance, s3, tiny_onnx, tmp_path):
    """--update --engine ray with the store in a bucket, from another working copy: the workers
    write the new photos' files into the bucket's staging folder, the switch moves them into place,
    and the bucket then holds what a fresh local build makes, with nothing staged left."""
    from tests.test_update import comparable, write_catalogue

    fs, _ = s3
    url = f"s3://bucket/{secrets.token_hex(4)}/ray-update"
    root = url.removeprefix("s3://")
    data = write_catalogue(tmp_path / "catalogue", list(range(24)))
    base = ["--dataset", str(data), "--onnx", str(tiny_onnx), "--limit", "0", "--shard-rows", "8", "--batch-size", "4",
            "--max-result-images", "5", "-q"]
    assert cli.main([*base, "--output-dir", url, "--work-dir", str(tmp_path / "copy1")]) == 0
    write_catalogue(data, [*range(0, 3), *range(4, 24), 60, 61, 62])  # row 3 gone; three added at the end
    assert cli.main([*base, "--output-dir", url, "--work-dir", str(tmp_path / "copy2"), "--update", "--engine", "ray"]
                    ) == 0
    fresh = tmp_path / "fresh"
    assert cli.main([*base, "--output-dir", str(fresh)]) == 0
    fs.invalidate_cache()
    images = {p.rsplit("/", 1)[1]: fs.cat_file(p) for p in fs.find(f"{root}/images")}
    assert images == {p.name: p.read_bytes() for p in (fresh / "images").iterdir()}
    updated = tmp_path / "updated"
    (updated / "embeddings").mkdir(parents=True)
    for name in store_file_names(fs.cat_file(f"{root}/embeddings/embeddings.json")):
        (updated / "embeddings" / name).write_bytes(fs.cat_file(f"{root}/embeddings/{name}"))
    (updated / "images").mkdir()
    for name, data_bytes in images.items():
        (updated / "images" / name).write_bytes(data_bytes)
    a_lines, a_vec, _ = comparable(updated)
    b_lines, b_vec, _ = comparable(fresh)
    assert a_lines == b_lines and np.array_equal(a_vec, b_vec)
    assert not [p for p in fs.find(root) if "/.update" in p]


def test_ray_segmented_build_equals_local(ray_instance, tiny_onnx, tmp_path):
    """Portrait then landscape photos in row groups of 5: the engines group photos differently (local
    by shard, Ray by piece), so a photo's persons must not depend on the photos beside it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pt = tmp_path / "person-seg.pt"
    assets.person_yolo("yolov8n-seg.yaml").save(pt)
    sizes = [(96, 128)] * 5 + [(128, 96)] * 7
    cells = [assets.encode(assets.rgb_image(w, h, seed=40 + i), "JPEG") for i, (w, h) in enumerate(sizes)]
    ds = tmp_path / "people"
    (ds / "data").mkdir(parents=True)
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    pq.write_table(pa.table({"image": pa.array([{"bytes": c, "path": None} for c in cells], type=image)}),
                   ds / "data" / "train-00000-of-00001.parquet", row_group_size=5)
    seg = ["--use-segmentation", "--seg-model", str(pt), "--seg-imgsz", "160"]
    assert cli.main([*_args(ds, tiny_onnx, tmp_path / "local"), *seg]) in (0, 3)
    assert cli.main([*_args(ds, tiny_onnx, tmp_path / "ray"), *seg, "--engine", "ray"]) in (0, 3)
    a, b = tmp_path / "local" / "embeddings_segment", tmp_path / "ray" / "embeddings_segment"
    assert (a / "manifest.csv").read_bytes() == (b / "manifest.csv").read_bytes()
    assert sum(r.person >= 0 for r in read_manifest(a / "manifest.csv")) >= 6  # persons were found
    assert np.abs(np.load(a / "embeddings.npy") - np.load(b / "embeddings.npy")).max() <= 1e-6


@pytest.mark.parametrize("workers", [1, 2, 16])
def test_the_last_pieces_are_cut_smaller_so_the_workers_finish_together(workers):
    groups = [Piece("parquet", "/d/train.parquet", 50 * g, 50, group=g) for g in range(40)]
    pieces = ray_engine.split_at_shards(groups, 512)
    cut = ray_engine.smaller_at_the_end(pieces, workers)
    assert [r for p in cut for r in range(p.first_row, p.first_row + p.rows)] == list(range(2000))
    assert len(cut) > len(pieces) and cut[-1].rows == 8
    tail = 0
    for p in reversed(cut):
        whole = next(q for q in pieces if q.first_row <= p.first_row < q.first_row + q.rows)
        assert p.first_row + p.rows <= whole.first_row + whole.rows and p.group == whole.group
        assert p.offset == whole.offset + p.first_row - whole.first_row  # where its rows start in the group
        if p.rows < whole.rows:  # a cut: a (2w-1)th of the rows after it, at least 8, no sliver left behind
            assert 8 <= p.rows < max(8, tail // (2 * workers - 1)) + 8
        tail += p.rows
    hub = [Piece("parquet", "hf://datasets/a/b/train.parquet", 50 * g, 50, group=g) for g in range(4)]
    assert ray_engine.smaller_at_the_end(hub, 2) == hub  # every cut would fetch its row group again


@pytest.mark.subprocess
def test_ray_address_joins_a_cluster_started_on_loopback(ragged, tiny_onnx, local_run, tmp_path, monkeypatch):
    """`ray start --head` on 127.0.0.1 (its own temp dir, token authentication), a run that joins it,
    then the head's processes (and only them) stopped.
    - Without RAY_AUTH_MODE=token, Ray does not send the token to an address named explicitly: the
      run ends in one line that says so, not an "unexpected ConnectionError".
    - A run given no address meanwhile starts its own Ray: Ray itself would join the cluster
      `ray start` left there, and refuse the run's num_cpus."""
    temp = Path(f"/tmp/rt{secrets.token_hex(3)}")  # short: Ray's socket paths have a length limit
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0"}
    for name in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH"):
        env.pop(name, None)
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))  # not ~/.ray/auth_token's
    start = [
        sys.executable,
        "-m",
        "ray.scripts.scripts",
        "start",
        "--head",
        "--node-ip-address=127.0.0.1",
        f"--port={port}",
        "--num-cpus=2",
        "--include-dashboard=false",
        f"--temp-dir={temp / 'ray'}",  # where a run with RAY_TMPDIR={temp} looks for the last cluster
        "--disable-usage-stats",
    ]

    def run(out: Path, *extra: str, **env_change: str | None) -> subprocess.CompletedProcess:
        run_env = {k: v for k, v in {**env, **env_change}.items() if v is not None}
        args = [sys.executable, str(ROOT / "main.py"), *_args(ragged, tiny_onnx, out, "--engine", "ray", *extra)]
        return subprocess.run(args, env=run_env, capture_output=True, text=True, timeout=600, cwd=ROOT)

    subprocess.run(start, env=env, check=True, capture_output=True, timeout=180)
    try:
        address = ("--ray-address", f"127.0.0.1:{port}")
        r = run(tmp_path / "refused", *address, RAY_AUTH_MODE=None)
        last = r.stderr.strip().splitlines()[-1]
        assert r.returncode == 1 and last.startswith(f"error: cannot join the Ray cluster at 127.0.0.1:{port} ("), last
        assert "only with RAY_AUTH_MODE=token and its token here" in last and "unexpected" not in r.stderr
        out = tmp_path / "cluster"
        r = run(out, *address)
        assert r.returncode == 3, r.stderr[-2000:]
        _same_store(local_run, out)
        # paths relative to the folder the run is given in, not the cluster's (every photo failed to be read),
        # the dataset's, the model's and the output's, and a cell's that names its picture by a path relative
        # to that folder (a joined cluster's workers read it from their own folder: failed): the store of a
        # local run from the same folder, with the same words
        import pyarrow as pa
        import pyarrow.parquet as pq

        elsewhere = tmp_path / "desk"
        (elsewhere / "rel").mkdir(parents=True)
        for i in range(3):
            (elsewhere / "rel" / f"p{i}.jpg").write_bytes(assets.jpeg_bytes(40 + i, 50, seed=i))
        linked = tmp_path / "linked"
        (linked / "data").mkdir(parents=True)
        cells = pa.array([{"bytes": None, "path": f"rel/p{i}.jpg"} for i in range(3)]
                         + [{"bytes": assets.jpeg_bytes(30, 60, seed=7), "path": None}],
                         pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
        pq.write_table(pa.table({"image": cells}), linked / "data" / "train-00000-of-00001.parquet")
        words = [os.path.relpath(p, elsewhere) for p in (linked, tiny_onnx, tmp_path / "relative")]
        r = subprocess.run([sys.executable, str(ROOT / "main.py"), *_args(*words, "--engine", "ray", *address)],
                           env=env, capture_output=True, text=True, timeout=600, cwd=elsewhere)
        assert r.returncode == 0 and "unexpected" not in r.stderr, r.stderr[-2000:]
        statuses = [row.status for row in read_manifest(tmp_path / "relative" / "embeddings" / "manifest.csv")]
        assert statuses == ["ok"] * 4, statuses
        words[2] = os.path.relpath(tmp_path / "relative-local", elsewhere)
        monkeypatch.chdir(elsewhere)
        assert cli.main(_args(*words)) == 0
        _same_store(tmp_path / "relative-local", tmp_path / "relative")
        assert (temp / "ray" / "ray_current_cluster").read_text().strip().endswith(f":{port}")  # Ray names its IP
        own = tmp_path / "own"
        r = run(own, RAY_TMPDIR=str(temp))
        assert r.returncode == 3, r.stderr[-2000:]
        _same_store(local_run, own)
    finally:
        import psutil

        for proc in psutil.process_iter(["cmdline"]):
            if any(str(temp) in part or f":{port}" in part for part in proc.info["cmdline"] or []):
                proc.kill()
        time.sleep(1)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.parametrize("mode", ["", "token"])
def test_a_cluster_that_refuses_the_run_is_one_line_with_its_remedy(mode, monkeypatch):
    """Ray raises ConnectionError for a cluster that is not there or refuses the token, and
    AuthenticationError where RAY_AUTH_MODE=token finds no token here: each is the run's one line."""
    from pipeline.errors import PipelineError

    def refuse(**kw):
        if mode:
            raise ray.exceptions.AuthenticationError("Token authentication is enabled but no token was found")
        raise ConnectionError("Failed to connect to Ray cluster at 10.0.0.5:6379")

    monkeypatch.setenv("RAY_AUTH_MODE", mode)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", refuse)
    monkeypatch.setattr(ray_engine, "probe_cluster", lambda address, named: None)  # a head that answers TCP
    with pytest.raises(PipelineError) as e:
        ray_engine.RaySession("10.0.0.5:6379", 1)
    said = str(e.value)
    assert said.startswith("cannot join the Ray cluster at 10.0.0.5:6379 (") and "`ray status` on its head" in said
    if mode:
        assert "no token was found" in said and "with RAY_AUTH_MODE=token set, the token here" in said
    else:
        assert "is joined only with RAY_AUTH_MODE=token and its token here" in said


def test_an_address_nothing_answers_or_of_no_form_is_refused_at_once(monkeypatch):
    """Ray retried a host:port nothing answers for about 14 minutes (20 tries of ~41 s) before its
    ConnectionError; a malformed address was an 'unexpected ValueError'. Neither reaches Ray now."""
    import socket

    from pipeline.errors import PipelineError, UsageError
    from tests.helpers import free_port

    called = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: called.append(kw))
    port = free_port()  # nothing listens there
    t = time.perf_counter()
    with pytest.raises(PipelineError, match=rf"^cannot join the Ray cluster at 127.0.0.1:{port} \(.*refused"):
        ray_engine.RaySession(f"127.0.0.1:{port}", 1)
    assert time.perf_counter() - t < ray_engine.PROBE_SECONDS + 2 and called == []
    for bad in ("foo", "10.0.0.5", "host:port"):
        with pytest.raises(UsageError, match=rf"--ray-address '{bad}' is no cluster address: give the head's"):
            ray_engine.RaySession(bad, 1)
    monkeypatch.setenv("RAY_ADDRESS", "nohost")
    with pytest.raises(UsageError, match="^RAY_ADDRESS 'nohost' is no cluster address"):
        ray_engine.RaySession(None, 1)
    assert called == []
    with pytest.raises(UsageError, match=r"'ray://10.0.0.5:10001': Ray Data does not run through Ray Client"):
        ray_engine.RaySession("ray://10.0.0.5:10001", 1)  # the form the message offered: an AttributeError in Ray
    assert called == []
    # an HTTP server where the head was meant (a dashboard, a mistyped port): Ray retried it for minutes
    import http.server

    web = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    serving = threading.Thread(target=web.serve_forever, daemon=True)
    serving.start()
    try:
        t = time.perf_counter()
        with pytest.raises(PipelineError, match=r"something answers there, but not a Ray head \(it does not speak "
                                                r"gRPC: it answered '[^']+'\); the head's GCS port is 6379"):
            ray_engine.RaySession(f"127.0.0.1:{web.server_address[1]}", 1)
        assert time.perf_counter() - t < 3 and called == []
    finally:
        web.shutdown()
        web.server_close()
    with socket.socket() as listening:  # a gRPC server answers: Ray is asked, and its ValueError is a usage error
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        address = f"http://127.0.0.1:{listening.getsockname()[1]}"

        def settings() -> None:  # as a gRPC server does: its own SETTINGS frame, to every connection
            while True:
                try:
                    conn, _ = listening.accept()
                except OSError:
                    return
                with conn:
                    conn.recv(64)
                    conn.sendall(b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")

        threading.Thread(target=settings, daemon=True).start()

        def invalid(**kw):
            raise ValueError(f"Invalid address format: {kw['address']}")

        monkeypatch.setattr(ray, "init", invalid)
        monkeypatch.setenv("RAY_ADDRESS", address)
        with pytest.raises(UsageError, match=r"^RAY_ADDRESS 'http://127.0.0.1:\d+': Invalid address format"):
            ray_engine.RaySession(None, 1)
        with pytest.raises(UsageError, match=r"^--ray-address 'http://127.0.0.1:\d+': Invalid address format"):
            ray_engine.RaySession(address, 1)
        # a cluster joined keeps Ray's actor restarts (fault tolerance); only a Ray the run starts drops them
        monkeypatch.setattr(ray, "init", lambda **kw: None)
        assert not ray_engine.RaySession(f"127.0.0.1:{listening.getsockname()[1]}", 1).started
    monkeypatch.delenv("RAY_ADDRESS")
    assert ray_engine.RaySession(None, 1).started


@pytest.mark.subprocess
def test_a_ray_the_run_starts_is_stopped_before_it_exits(ragged, tiny_onnx, local_run, tmp_path):
    """No address: the run starts its own Ray (its model loading meanwhile) and stops it in the
    background once the build is done; it exits with none of Ray's processes left."""
    temp = Path(f"/tmp/rt{secrets.token_hex(3)}")  # short: Ray's socket paths have a length limit
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_TMPDIR": str(temp), "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    out = tmp_path / "own"
    args = [a for a in _args(ragged, tiny_onnx, out, "--engine", "ray", "--threads", "2") if a != "-q"]
    import psutil

    def left() -> list[psutil.Process]:
        return [
            p for p in psutil.process_iter(["cmdline"]) if any(str(temp) in part for part in p.info["cmdline"] or [])
        ]

    try:
        r = subprocess.run(
            [sys.executable, str(ROOT / "main.py"), *args], env=env, capture_output=True, text=True, timeout=600
        )
        assert r.returncode == 3, r.stderr[-2000:]
        assert "ray start + load model" in r.stdout
        assert "Token authentication is enabled" not in r.stderr  # Ray's default, kept, not announced
        # the actors of a Ray the run started are not restarted: Ray's error-level line about restartable
        # actors with constructor arguments in its object store is gone
        assert "core_worker.cc" not in r.stderr and "max_restarts" not in r.stderr, r.stderr[-2000:]
        peak = re.search(r"peak memory during the Ray build, this process and its Ray processes together: ([\d,]+) MiB",
                         r.stdout)
        assert peak and int(peak[1].replace(",", "")) > 300  # the driver alone is more; the workers add theirs
        _same_store(local_run, out)
        assert not left()
    finally:
        for proc in left():
            proc.kill()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.subprocess
def test_ray_is_optional(ragged, tiny_onnx, tmp_path):
    code = (
        "import sys; sys.modules['ray'] = None; import main; "
        f"rc = main.main(['--dataset', {str(ragged)!r}, '--onnx', {str(tiny_onnx)!r}, "
        f"'--output-dir', {str(tmp_path)!r}, '--engine', 'ray', '-q']); assert rc == 2, rc"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "--engine ray needs Ray Data: pip install 'ray[data]'" in r.stderr
    local = (
        f"import sys, main; rc = main.main(['--dataset', {str(ragged)!r}, '--onnx', {str(tiny_onnx)!r}, "
        f"'--output-dir', {str(tmp_path / 'l')!r}, '-q', '--limit', '5']); "
        "assert 'ray' not in sys.modules, 'ray imported'"
    )
    r = subprocess.run([sys.executable, "-c", local], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_ray_refuses_a_format_it_does_not_read(ray_instance, tiny_onnx, tmp_path, capsys):
    import datasets

    ds = tmp_path / "saved"
    datasets.Dataset.from_dict(
        {"image": [{"bytes": assets.jpeg_bytes(20, 20), "path": None}]},
        features=datasets.Features({"image": datasets.Image()}),
    ).save_to_disk(str(ds))
    assert (
        cli.main(
            [
                "--dataset",
                str(ds),
                "--onnx",
                str(tiny_onnx),
                "--output-dir",
                str(tmp_path / "o"),
                "--engine",
                "ray",
                "-q",
            ]
        )
        == 2
    )
    assert "--engine ray reads parquet datasets" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # said before a folder is made (an empty embeddings/ was left)


def test_an_update_on_ray_equals_a_fresh_local_build(ray_instance, tiny_onnx, tmp_path):
    """--update --engine ray: the new photos are built by Ray Data (only their rows, the shards
    around them empty), merged like a local update's, and the store equals a fresh local build."""
    from tests.test_update import assert_same_as_fresh, write_catalogue

    data = write_catalogue(tmp_path / "catalogue", list(range(24)))
    out, fresh = tmp_path / "updated", tmp_path / "fresh"
    base = ["--dataset", data, "--onnx", tiny_onnx, "--limit", "0", "--shard-rows", "8", "--batch-size", "4",
            "--max-result-images", "5", "-q"]
    assert cli.main([*map(str, base), "--output-dir", str(out)]) == 0
    write_catalogue(data, [*range(0, 3), *range(4, 24), 60, 61, 62])  # row 3 gone; three added at the end
    assert cli.main([*map(str, base), "--output-dir", str(out), "--update", "--engine", "ray"]) == 0
    assert cli.main([*map(str, base), "--output-dir", str(fresh)]) == 0
    assert_same_as_fresh(out, fresh)


def test_a_cluster_without_a_cpu_is_refused_not_waited_on(ray_instance, ragged, tiny_onnx, tmp_path, monkeypatch,
                                                          capsys):
    """A head started with --num-cpus 0 and no workers: the build's actors waited for a CPU forever
    (Ray's "may hang forever" after a minute, the bar at 0)."""
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"memory": 1e9, "object_store_memory": 1e8})
    assert cli.main(_args(ragged, tiny_onnx, tmp_path / "out", "--engine", "ray")) == 1
    assert "the Ray cluster has no CPU to run the build's workers on" in capsys.readouterr().err


def test_a_workers_failure_is_the_runs_one_line_and_a_dead_worker_says_the_run_resumes():
    """An actor that died (killed for memory) ended the run as "unexpected ActorDiedError (run with -v
    for the traceback)", exit 1, though its complete shards were kept; the project's own error raised
    in a worker came through Ray's wrappers as an "unexpected RayTaskError"."""
    from pipeline.errors import PipelineError, UsageError

    inside = ray.exceptions.RayTaskError("_ItemsAndVectors.__init__", "Traceback ...",
                                         UsageError("ONNX file onnx/x.onnx not found")).as_instanceof_cause()
    said = ray_engine.worker_error(inside)
    assert type(said) is UsageError and str(said) == "ONNX file onnx/x.onnx not found"
    died = ray_engine.worker_error(ray.exceptions.ActorDiedError())
    assert type(died) is PipelineError and str(died).startswith(
        "a Ray worker stopped before its work was done (ActorDiedError: The actor died unexpectedly")
    assert "the shards it completed are kept: run the same command again to resume" in str(died)
    assert ray_engine.worker_error(ValueError("a bug here")) is None  # not Ray's: raised as it is


def test_the_shared_folder_check_asks_every_node_even_two_on_one_host(tmp_path):
    """Nodes were keyed by their address: two nodes on one host were one, and only one of them asked."""
    from pipeline.errors import PipelineError

    class Remote:
        def __init__(self, fn, node=None):
            self.fn, self.node = fn, node

        def options(self, scheduling_strategy):
            return Remote(self.fn, scheduling_strategy.node_id)

        def remote(self, path, token):
            asked.append(self.node)
            return False if self.node.startswith("bbbb") else self.fn(path, token)  # the second node sees no folder

    class OneHostTwoNodes:
        @staticmethod
        def nodes():
            return [{"Alive": True, "NodeManagerAddress": "10.0.0.2", "NodeID": node} for node in ("a" * 56,
                                                                                               "b" * 56)]

        @staticmethod
        def remote(**kw):
            return Remote

        @staticmethod
        def get(ref):
            return ref

    asked: list[str] = []
    with pytest.raises(PipelineError, match=r"not shared with every node of the Ray cluster \(10\.0\.0\.2 \(node "
                                            r"bbbbbbbb\) cannot see it\)"):
        ray_engine.check_shared_folder(OneHostTwoNodes(), tmp_path / "out")
    assert sorted(asked) == ["a" * 56, "b" * 56]


def test_a_ray_session_puts_the_runs_sigterm_handler_back(monkeypatch):
    """ray.init installs its own SIGTERM handler (sys.exit(15)): a run on Ray stopped by SIGTERM exited
    15 with nothing said, not as Ctrl-C is (the work kept, said, exit 143)."""
    import signal as signals

    def ours(signum, frame):
        raise KeyboardInterrupt

    def init(**kw):  # as Ray's own does
        signals.signal(signals.SIGTERM, lambda *a: sys.exit(signals.SIGTERM))

    before = signals.signal(signals.SIGTERM, ours)
    try:
        monkeypatch.setattr(ray, "is_initialized", lambda: False)
        monkeypatch.setattr(ray, "init", init)
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
        ray_engine.RaySession(None, 1)
        assert signals.getsignal(signals.SIGTERM) is ours
    finally:
        signals.signal(signals.SIGTERM, before)


def test_a_gpu_that_is_not_there_is_said_before_ray_starts(ragged, tiny_onnx, tmp_path, monkeypatch, capsys):
    """--engine ray --device cuda on a machine without one was refused once Ray had started (15 s)."""
    import onnxruntime as ort

    from pipeline import ray_engine

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has a CUDA provider")

    def started(*_: object, **__: object) -> None:
        raise AssertionError("Ray was started")

    monkeypatch.setattr(ray_engine, "RaySession", started)
    assert cli.main(_args(ragged, tiny_onnx, tmp_path / "o", "--engine", "ray", "--device", "cuda")) == 1
    assert "--device cuda asked for, but this onnxruntime has no CUDA provider" in capsys.readouterr().err
    assert not (tmp_path / "o" / "embeddings").exists()
