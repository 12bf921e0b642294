"""End-to-end runs of main([...]) on generated data: the standard pipeline and its cache."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

import main as cli
from pipeline.embedders import Embedder, EmbedderSpec, make_embedder
from pipeline.identity import VectorIdentity
from pipeline.images import decode_image
from pipeline.preprocess import preprocess
from pipeline.store import read_manifest
from tests import assets
from tests.conftest import mixed_cells
from tests.helpers import file_of, run


@pytest.fixture(scope="module")
def standard_run(tmp_path_factory, mixed_dataset, tiny_clip):
    out = tmp_path_factory.mktemp("standard")
    code = run(
        "--dataset",
        mixed_dataset,
        "--model",
        tiny_clip,
        "--backend",
        "torch",
        "--output-dir",
        out,
        "--batch-size",
        4,
        "--shard-rows",
        8,
    )
    return out, code


def test_standard_run_outputs(standard_run):
    out, code = standard_run
    assert code == 3  # finished, with recorded item failures
    rows = read_manifest(out / "embeddings" / "manifest.csv")
    kinds = [k for k, _ in mixed_cells()]
    assert [r.source_row for r in rows] == list(range(len(kinds)))
    assert [r.index for r in rows] == list(range(len(kinds)))
    failed = {r.source_row: r.error for r in rows if r.status == "failed"}
    assert set(failed) == {kinds.index("corrupt"), kinds.index("empty")}
    assert "not a recognized image format" in failed[kinds.index("corrupt")]
    emb = np.load(out / "embeddings" / "embeddings.npy")
    assert emb.dtype == np.float32 and emb.shape == (len(kinds) - 2, 16)
    assert np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    assert sorted(r.embedding_row for r in rows if r.status == "ok") == list(range(len(emb)))
    # JPEG/PNG kept byte for byte; WebP encoded once as PNG; sha256 is of the written file.
    for r, (kind, cell) in zip(rows, mixed_cells()):
        if r.status != "ok":
            assert r.file == "" and r.embedding_row == -1
            continue
        data = (out / "images" / r.file).read_bytes()
        assert r.file == f"img_{r.sha256[:16]}." + ("png" if kind in ("rgba", "gray", "webp") else "jpg")
        if kind != "webp":
            assert data == cell
        assert __import__("hashlib").sha256(data).hexdigest() == r.sha256
    exif = rows[kinds.index("exif")]
    assert (exif.width, exif.height) == (40, 80)
    side = json.loads((out / "embeddings" / "embeddings.json").read_text())
    assert side["count"] == len(emb) and side["dim"] == 16 and side["identity"]["backend"] == "torch"
    assert side["identity"]["precision"] == "fp32"
    # retrieval table, pictures, matrix, plots
    with open(out / "retrieval_results" / "neighbours.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(emb) * 5
    assert all(t["query"] != t["neighbour"] for t in table)
    for q in {t["query"] for t in table}:  # ranks 1..k per query, distances ascending with rank
        mine = [t for t in table if t["query"] == q]
        assert [int(t["rank"]) for t in mine] == [1, 2, 3, 4, 5]
        assert [float(t["distance"]) for t in mine] == sorted(float(t["distance"]) for t in mine)
    pics = sorted((out / "retrieval_results").glob("*_matches.jpg"))
    assert len(pics) == len(emb)
    m = np.load(out / "outputs" / "distance_matrix.npy")
    assert m.shape == (len(emb), len(emb)) and np.allclose(m, 1 - emb @ emb.T, atol=1e-5)
    assert (out / "outputs" / "distance_heatmap.png").stat().st_size > 1000
    assert (out / "outputs" / "nearest_neighbour_hist.png").stat().st_size > 1000
    assert not (out / "embeddings" / ".partial").exists()


def test_embedding_rows_equal_fresh_embeddings_of_their_files(standard_run, tiny_clip):
    out, _ = standard_run
    rows = read_manifest(out / "embeddings" / "manifest.csv")
    emb = np.load(out / "embeddings" / "embeddings.npy")
    embedder = make_embedder(EmbedderSpec(model=str(tiny_clip), backend="torch", device="cpu"))
    for r in rows:
        if r.status != "ok":
            continue
        img = decode_image(
            (out / "images" / r.file).read_bytes(), min_side=embedder.preprocess_cfg.decode_min_side
        ).image
        fresh = embedder.embed(preprocess(img, embedder.preprocess_cfg)[None])[0]
        assert np.allclose(emb[r.embedding_row], fresh, atol=1e-5), r.file
        others = np.delete(emb, r.embedding_row, axis=0)
        assert not np.any(np.all(np.isclose(others, fresh, atol=1e-5), axis=1))


def test_neighbour_table_matches_embeddings(standard_run):
    out, _ = standard_run
    rows = read_manifest(out / "embeddings" / "manifest.csv")
    by_index = {r.index: r for r in rows}
    emb = np.load(out / "embeddings" / "embeddings.npy")
    with open(out / "retrieval_results" / "neighbours.csv") as f:
        for t in csv.DictReader(f):
            q, n = by_index[int(t["query"])], by_index[int(t["neighbour"])]
            assert q.file == t["query_file"] and n.file == t["neighbour_file"]
            d = 1 - float(emb[q.embedding_row] @ emb[n.embedding_row])
            assert abs(d - float(t["distance"])) < 1e-5


def test_use_embeddings_reuses_then_refuses_after_tampering(standard_run, tiny_clip, tmp_path, capsys):
    src, _ = standard_run
    out = tmp_path / "copy"
    shutil.copytree(src, out)
    shutil.rmtree(out / "retrieval_results")
    base = ("--use-embeddings", "--model", tiny_clip, "--backend", "torch", "--output-dir", out)
    assert run(*base) == 3  # the recorded failures are reported again
    assert len(list((out / "retrieval_results").glob("*_matches.jpg"))) == 22
    # a different model asked for
    other = assets.save_tiny_clip(tmp_path / "other-clip", seed=1)
    capsys.readouterr()
    assert run("--use-embeddings", "--model", other, "--backend", "torch", "--output-dir", out) == 1
    assert "model" in capsys.readouterr().err
    # a dataset other than the cache's
    assert run(*base, "--limit", 5) == 1
    assert "limit: cache has 10000, asked for 5" in capsys.readouterr().err
    # an image deleted
    first = file_of(out, 0)
    (out / "images" / first).unlink()
    assert run(*base) == 1
    err = capsys.readouterr().err
    assert "1 image(s) missing" in err and first in err


def test_image_files_are_hashed_once_then_trusted_while_their_size_and_time_hold(
    standard_run, tiny_clip, tmp_path, monkeypatch, capsys
):
    from pipeline import store

    src, _ = standard_run
    out = tmp_path / "copy"
    shutil.copytree(src, out)
    base = ("--use-embeddings", "--model", tiny_clip, "--backend", "torch", "--output-dir", out)
    assert run(*base) == 3  # another folder than the one recorded: every image hashed once
    record = json.loads((out / "embeddings" / store.VERIFIED_FILE).read_text())
    files = [r.file for r in read_manifest(out / "embeddings" / "manifest.csv") if r.embedding_row >= 0]
    assert record["images"] == str((out / "images").resolve()) and set(record["files"]) == set(files)
    hashed: list[str] = []
    real = store.sha256_file
    monkeypatch.setattr(store, "sha256_file", lambda p, *a: hashed.append(Path(p).name) or real(p, *a))
    assert run(*base) == 3
    assert not [name for name in hashed if name in files]  # none hashed again
    victim = out / "images" / files[0]
    data = bytearray(victim.read_bytes())
    data[-3] ^= 0xFF  # the same size, other bytes, a later modification time
    victim.write_bytes(bytes(data))
    capsys.readouterr()
    assert run(*base) == 1
    assert f"1 image(s) changed since embedding (e.g. {files[0]})" in capsys.readouterr().err
    assert [name for name in hashed if name in files] == [files[0]]  # that one alone was hashed


def test_use_embeddings_refuses_edited_manifest_and_truncated_embeddings(standard_run, tiny_clip, tmp_path, capsys):
    src, _ = standard_run
    base = lambda out: ("--use-embeddings", "--model", tiny_clip, "--backend", "torch", "--output-dir", out)  # noqa: E731
    out = tmp_path / "a"
    shutil.copytree(src, out)
    man = out / "embeddings" / "manifest.csv"
    man.write_text(man.read_text().replace(file_of(out, 1), file_of(out, 3)))
    assert run(*base(out)) == 1
    assert "manifest.csv was changed" in capsys.readouterr().err
    out = tmp_path / "b"
    shutil.copytree(src, out)
    p = out / "embeddings" / "embeddings.npy"
    p.write_bytes(p.read_bytes()[:-100])
    assert run(*base(out)) == 1
    err = capsys.readouterr().err
    assert "truncated or replaced" in err
    # damaged, not made otherwise: no flag reuses it, and the refusal says how to go on (it gave no way)
    assert "Rebuild it: run the same command without --use-embeddings (the damaged store is replaced)." in err
    out = tmp_path / "c"  # a thumbnail's byte changed, the size kept: its stamp no longer holds, so it is hashed
    shutil.copytree(src, out)
    assert run(*base(out)) == 3
    p = out / "embeddings" / "thumbnails.npy"
    data = bytearray(p.read_bytes())
    data[-5] ^= 0xFF
    p.write_bytes(bytes(data))
    assert run(*base(out)) == 1
    assert "thumbnails.npy does not match the sidecar" in capsys.readouterr().err
    assert (
        run("--use-embeddings", "--output-dir", tmp_path / "nothing-here", "--model", tiny_clip, "--backend", "torch")
        == 1
    )
    assert "embeddings.json is missing" in capsys.readouterr().err


def test_alignment_past_1000_rows(tmp_path, tiny_onnx):
    """Row/file pairing through the manifest, never directory order, past 1000 rows."""
    n = 1030
    cells = [
        assets.encode(assets.rgb_image(8, 8, color=(i % 256, (i * 7) % 256, (i // 256) * 40)), "PNG") for i in range(n)
    ]
    ds = assets.write_parquet_dataset(tmp_path / "many", cells)
    out = tmp_path / "out"
    assert (
        run(
            "--dataset",
            ds,
            "--onnx",
            tiny_onnx,
            "--output-dir",
            out,
            "--batch-size",
            64,
            "--max-result-images",
            3,
            "--limit",
            0,
        )
        == 0
    )
    rows = read_manifest(out / "embeddings" / "manifest.csv")
    emb = np.load(out / "embeddings" / "embeddings.npy")
    assert len(rows) == n and len(emb) == n
    embedder = make_embedder(EmbedderSpec(onnx=str(tiny_onnx), backend="onnx"))
    for r in (rows[101], rows[1000], rows[1029]):
        assert r.file == f"img_{r.sha256[:16]}.png"
        img = decode_image((out / "images" / r.file).read_bytes()).image
        assert tuple(np.asarray(img)[0, 0]) == (
            r.source_row % 256,
            (r.source_row * 7) % 256,
            (r.source_row // 256) * 40,
        )
        assert np.allclose(
            emb[r.embedding_row], embedder.embed(preprocess(img, embedder.preprocess_cfg)[None])[0], atol=1e-5
        )
    assert len(list((out / "retrieval_results").glob("*_matches.jpg"))) == 3


@pytest.mark.parametrize(
    "args, message",
    [
        (["--use-embeddings", "--use-embedded-segment"], "contradict"),
        (["--use-embeddings", "--use-segmentation"], "use-embedded-segment"),
        (["--batch-size", "0"], "must be >= 1"),
        (["--serve", "--port", "70000"], "--port: must be <= 65535, got 70000"),
        (["--top-k", "x"], "whole number"),
        (["--backend", "tensorflow"], "invalid choice"),
        (["--fresh", "--use-embeddings"], "--fresh"),
        (["-v", "-q"], "not allowed with"),
        (["--device", "cpu", "--precision", "fp16"], "needs --device cuda"),
        (["--use-embedded-segment", "--use-segmentation"], "already means segmentation"),
        (["--evaluate", "--use-embeddings"], "does not read a cache"),
        (["--evaluate", "--use-embedded-segment"], "does not read a cache"),
        (["--backend", "onnx", "--precision", "fp32"], "--precision fp32 applies to the torch backend, and --backend "
                                                       "onnx runs the ONNX file"),
        (["--onnx", "edge/m_int8.onnx", "--precision", "fp32"], "applies to the torch backend, and --onnx "
                                                                "edge/m_int8.onnx runs that file"),
        (["--export-onnx", "--precision", "fp16"], "--precision and --backend do not apply to it"),
        (["--dataset", ".", "--config", "small"], "--config picks a configuration of a hub dataset; --dataset . is a "
                                                  "local folder or file"),
        (["--export-onnx", "--backend", "onnx"], "--precision and --backend do not apply to it"),
        (["--export-onnx", "--use-embeddings"], "--export-onnx makes the ONNX file and stops"),
        (["--export-onnx", "--use-segmentation"], "--export-onnx makes the ONNX file and stops"),
        (["--export-onnx", "--evaluate"], "--export-onnx and --evaluate are separate modes"),
        (["--export-onnx", "--output-dir", "runs/x"], "--export-onnx writes where --onnx says"),
        (["--evaluate", "--serve", "--video_clip", "c"], "--video_clip and --evaluate and --serve are separate"),
        (["--no-annotated-video"], "--no-annotated-video needs --video_clip NAME"),
        (["--video_dir", "v"], "--video_dir needs --video_clip NAME"),
        # an empty value ("$CLIP" unset in a script) named the current folder, or ran another mode
        (["--video_clip", ""], "argument --video_clip/--video-clip: an empty value names nothing"),
        (["--output-dir", ""], "argument --output-dir: an empty value names nothing"),
        (["--dataset", " "], "argument --dataset: an empty value names nothing"),
        (["--model", ""], "argument --model: an empty value names nothing"),
        (["--onnx", ""], "argument --onnx: an empty value names nothing"),
        (["--query-image", ""], "argument --query-image: an empty value names nothing"),
        (["--evaluate", "--eval-id-column", ""], "argument --eval-id-column: an empty value names nothing"),
        (["--video_clip", "c", "--video_dir", ""], "argument --video_dir/--video-dir: an empty value names nothing"),
        # a flag cut short is not taken for the one it begins: a flag added later could change its meaning
        (["--lim", "5"], "unrecognized arguments: --lim 5; --lim: did you mean --limit?"),
        (["--top-k", "30000000"], "argument --top-k: must be <= 1000, got 30000000"),
        (["--backend", "torch", "--onnx", "m.onnx"], "--onnx names a file to run, and --backend torch runs --model"),
        (["--export-onnx", "--device", "cuda"], "--export-onnx exports, quantizes and verifies on the CPU"),
        (["--export-onnx", "--onnx", "nos/model"], "give it the .onnx suffix (nos/model.onnx)"),
        (["--export-onnx", "--onnx", "onnx/m_fp32.onnx"], "a name ending in _fp32 would hold the int8 file"),
    ],
)
def test_bad_flags_exit_2(args, message, capsys):
    assert cli.main(args) == 2
    assert message in capsys.readouterr().err


def test_a_query_flag_given_twice_keeps_both():
    """--query-text a --query-text b searched only b, without a word."""
    from pipeline.config import config_from_flags

    parser = cli.build_parser()
    args = parser.parse_args(["--query-text", "red dress", "--query-text", "blue shoe", "--query-image", "a.jpg",
                              "--query-image", "b.jpg", "c.jpg"])
    assert (args.query_text, args.query_image) == (["red dress", "blue shoe"], ["a.jpg", "b.jpg", "c.jpg"])
    cfg = config_from_flags(vars(parser.parse_args(["--filter", "", "--group-by", "", "--eval-models", "",
                                                    "--eval-backends", ""])))
    assert (cfg.filter, cfg.group_by) == (None, None)  # an empty value that means something is taken
    # a blank filter is an empty one (it was refused as "the filter is empty", where "" ran unfiltered)
    blank = config_from_flags(vars(parser.parse_args(["--filter", "   ", "--group-by", " "])))
    assert (blank.filter, blank.group_by) == (None, None)
    assert cfg.evaluate.models == () and cfg.evaluate.backends == ()  # the model and backend in use


def test_precision_is_refused_where_the_default_onnx_file_would_run(tmp_path, monkeypatch, capsys):
    """The default --onnx file, there, is what a run without --backend embeds with: a --precision typed
    with it said nothing and made int8 vectors. Refused with both ways on; --backend torch takes it."""
    from pipeline.embedders import EmbedderSpec

    monkeypatch.chdir(tmp_path)
    default = Path(EmbedderSpec().onnx)
    default.parent.mkdir(parents=True, exist_ok=True)
    default.write_bytes(b"stands for the default file")
    assert cli.main(["--precision", "fp32", "--dataset", "shop"]) == 2
    said = capsys.readouterr().err
    assert f"this run embeds with the ONNX file at the default --onnx, {default}, which is there" in said
    assert "Drop --precision, or add --backend torch (and --model) to run the model at it" in said
    assert cli.main(["--precision", "fp32", "--backend", "torch", "--dataset", "shop"]) == 1  # taken: no such dataset
    assert "applies to the torch backend" not in capsys.readouterr().err
    # a search without model flags embeds with the store's own embedder: a torch one takes --precision
    # (loading the store checks it), an ONNX file's is fixed
    sidecar = tmp_path / "outputs_here"
    for backend, refused in (("torch", False), ("onnx", True)):
        store = sidecar / backend / "embeddings"
        store.mkdir(parents=True)
        (store / "embeddings.json").write_text(json.dumps({"identity": {"backend": backend}}))
        capsys.readouterr()
        code = cli.main(["--precision", "fp16", "--query-text", "red dress", "--output-dir", str(sidecar / backend)])
        said = capsys.readouterr().err
        assert (code == 2 and "embeds with the ONNX file that made its store" in said) == refused, said
    # --config default is the default configuration, what no --config reads
    from pipeline.config import config_from_flags

    assert config_from_flags(vars(cli.build_parser().parse_args(["--config", "default"]))).dataset.config is None
    # --group-by "": each photo, as "" says in the Catalog API and the page's JSON (not an unknown column '')
    assert config_from_flags(vars(cli.build_parser().parse_args(["--group-by", ""]))).group_by is None
    assert config_from_flags(vars(cli.build_parser().parse_args(["--group-by", "sku"]))).group_by == "sku"
    # a folder named with a trailing slash is the folder: its rows are named ds[3], not ds/[3]
    assert config_from_flags(vars(cli.build_parser().parse_args(["--dataset", "data/ds/"]))).dataset.name == "data/ds"


def test_unwritable_output_dir_is_refused_before_work(tmp_path, tiny_clip, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert run("--dataset", tmp_path, "--model", tiny_clip, "--output-dir", blocker / "sub") == 1
    # the file in the way named ("not writable: File exists" said nothing of it)
    assert (f"output folder {blocker / 'sub'} is under {blocker}, a file, not a folder. Choose a folder with "
            "--output-dir.") in capsys.readouterr().err
    assert run("--dataset", tmp_path, "--model", tiny_clip, "--output-dir", blocker) == 1
    assert f"output folder {blocker} is a file, not a folder." in capsys.readouterr().err


@pytest.mark.parametrize("flag, value, said", [
    ("--dataset", "{tmp}/photos", "--dataset {tmp}/photos: no such file or folder"),
    ("--dataset", "./shop.parquet", "--dataset ./shop.parquet: no such file or folder"),
    ("--model", "{tmp}/models/fashion-clip", "--model {tmp}/models/fashion-clip: no such folder"),
    ("--model", "open_clip:ViT-B-32:{tmp}/vit.bin", "--model open_clip:ViT-B-32:{tmp}/vit.bin: no weights file"),
    ("--onnx", "{tmp}/m_int8.onnx", "--onnx {tmp}/m_int8.onnx: no such file (make it with"),
])
def test_a_typed_path_with_nothing_there_is_a_bad_flag_said_before_anything_opens(flag, value, said, tmp_path,
                                                                                   monkeypatch, capsys):
    """A mistyped path exits 2 with the flag named, before the (default, hub) dataset or a model is
    opened: --onnx was found missing after the dataset opened (offline, the hub's error hid it), and
    --model /path was sent to the hub as an id."""
    monkeypatch.chdir(tmp_path)
    tmp = str(tmp_path)
    assert run(flag, value.format(tmp=tmp), "--output-dir", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert said.format(tmp=tmp) in err and "hub" not in err.split(":", 2)[-1].split("(")[0]
    assert not (tmp_path / "out").exists()


def test_a_path_that_could_be_a_hub_id_or_is_written_by_the_run_is_not_refused(tmp_path):
    from pipeline.config import config_from_flags
    from pipeline.modes import _missing_path

    def problem(**flags):
        return _missing_path(config_from_flags(flags, frozenset(flags)))

    assert problem(model="someone/fashion-model") is None  # the hub's to say
    assert problem(model="hf-hub:Marqo/marqo-fashionSigLIP") is None
    assert problem(dataset="owner/shop") is None
    assert problem(onnx=str(tmp_path / "new_int8.onnx"), export_onnx=True) is None  # what the export writes
    assert problem(dataset=str(tmp_path)) is None
    # a mode that reads the store, not the dataset: a --dataset moved since (typed to match the store) is taken
    gone = str(tmp_path / "moved-away")
    assert problem(dataset=gone, query_text=["red"]) is None and problem(dataset=gone, use_embeddings=True) is None
    assert problem(dataset=gone) is not None and problem(dataset=gone, update=True) is not None
    # the export advised makes the file of the model typed (the default hub model's before); a search is told
    # to pass the store's own file, which another export would not give back
    said = problem(onnx=str(tmp_path / "m_int8.onnx"), model=str(tmp_path))
    assert said == (f"--onnx {tmp_path / 'm_int8.onnx'}: no such file (make it with python main.py --export-onnx "
                    f"--model {tmp_path} --onnx {tmp_path / 'm_int8.onnx'})")
    assert "pass the file that made the store" in problem(onnx=str(tmp_path / "m_int8.onnx"), query_text=["red"])
    assert "pass the file that made the store" in problem(onnx=str(tmp_path / "m_int8.onnx"), update=True)
    # --evaluate: the file its onnx-int8 row runs, said at once; its fp32 row's twin says what it needs itself
    assert problem(onnx=str(tmp_path / "m_int8.onnx"), evaluate=True, eval_backends="torch,onnx-int8") is not None
    assert problem(onnx=str(tmp_path / "m_int8.onnx"), evaluate=True) is not None
    assert problem(onnx=str(tmp_path / "m_int8.onnx"), evaluate=True, eval_backends="torch,onnx-fp32") is None


def test_an_onnx_file_named_but_missing_is_reported_not_replaced(tmp_path, mixed_dataset, tiny_clip, capsys):
    # --backend auto falls back to the transformers model only when --onnx is left at its default
    absent = tmp_path / "edge" / "model_int8.onnx"
    args = ("--dataset", mixed_dataset, "--model", tiny_clip, "--output-dir", tmp_path / "out", "-q")
    assert run(*args, "--onnx", absent) == 2  # a bad flag, said before the dataset or a model is opened
    assert f"--onnx {absent}: no such file (make it with python main.py --export-onnx" in capsys.readouterr().err
    assert not (tmp_path / "out" / "embeddings" / "embeddings.npy").exists()
    # with --backend torch the file would go unused: refused, not ignored without a word
    assert run(*args, "--onnx", absent, "--backend", "torch", "--limit", "4") == 2
    assert "--onnx names a file to run, and --backend torch runs --model itself" in capsys.readouterr().err


def test_missing_dataset_column_message(tmp_path, mixed_dataset, tiny_clip, capsys):
    assert (
        run(
            "--dataset",
            mixed_dataset,
            "--image-column",
            "picture",
            "--model",
            tiny_clip,
            "--backend",
            "torch",
            "--output-dir",
            tmp_path,
        )
        == 1
    )
    err = capsys.readouterr().err
    assert "no column 'picture'" in err and "'image'" in err


@pytest.mark.subprocess
def test_help_needs_no_torch():
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import sys, main; rc = main.main(['--help']); assert rc == 0; "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[1], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "--use-embeddings" in r.stdout
    # a default of 0 is shown (0 == False hid it), an unset or switched-off one is not
    assert "0 = all cores (default: 0)" in " ".join(r.stdout.split())
    assert "(default: False)" not in r.stdout and "(default: None)" not in r.stdout


def test_sidecar_and_verbose_summary_name_the_cpu(standard_run, tmp_path, tiny_clip, mixed_dataset, capsys):
    from pipeline.machine import cpu_info

    out, _ = standard_run
    side = json.loads((out / "embeddings" / "embeddings.json").read_text())
    assert side["machine"]["model"] == cpu_info()["model"] and side["machine"]["isa"] == cpu_info()["isa"]
    shutil.copytree(out, tmp_path / "v")
    capsys.readouterr()
    assert (
        cli.main(
            [
                "--use-embeddings",
                "--model",
                str(tiny_clip),
                "--backend",
                "torch",
                "--output-dir",
                str(tmp_path / "v"),
                "-v",
            ]
        )
        == 3
    )
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("cpu:"))
    assert cpu_info()["model"] in line and all(f in line for f in cpu_info()["isa"])


def test_use_embeddings_refuses_tampered_thumbnails(standard_run, tiny_clip, tmp_path, capsys):
    src, _ = standard_run
    out = tmp_path / "t"
    shutil.copytree(src, out)
    thumbs = out / "embeddings" / "thumbnails.npy"
    data = bytearray(thumbs.read_bytes())
    data[-1] ^= 0xFF  # one pixel of the last thumbnail: the file still parses
    thumbs.write_bytes(bytes(data))
    assert np.load(thumbs).shape == np.load(src / "embeddings" / "thumbnails.npy").shape
    assert run("--use-embeddings", "--model", tiny_clip, "--backend", "torch", "--output-dir", out) == 1
    assert "thumbnails.npy does not match the sidecar" in capsys.readouterr().err


class _NanForRed(Embedder):
    """A fake embedder: vectors from the mean colour; NaN for a reddish picture, zeros for a greenish one."""

    def __init__(self, base):
        self.preprocess_cfg, self.dim, self.identity = base.preprocess_cfg, 4, VectorIdentity(backend="fake")

    def embed(self, pixels):
        m = pixels.mean(axis=(2, 3))
        out = np.concatenate([m, np.ones((len(m), 1), np.float32)], axis=1).astype(np.float32)
        out[m[:, 0] - m[:, 1] > 1.0] = np.nan
        out[m[:, 1] - m[:, 0] > 1.0] = 0.0
        return out


def test_nan_or_zero_embedding_fails_its_item(tmp_path, tiny_onnx, monkeypatch):
    from pipeline import galleries

    colours = [(128, 128, 128), (250, 5, 5), (90, 90, 90), (5, 250, 5), (60, 60, 60)]
    ds = assets.write_parquet_dataset(
        tmp_path / "ds", [assets.encode(assets.rgb_image(40, 40, color=c), "PNG") for c in colours]
    )
    monkeypatch.setattr(
        galleries,
        "make_embedder",
        lambda spec: _NanForRed(make_embedder(EmbedderSpec(onnx=str(tiny_onnx), backend="onnx"))),
    )
    out = tmp_path / "out"
    assert run("--dataset", ds, "--onnx", tiny_onnx, "--output-dir", out, "--max-result-images", "0") == 3
    rows = read_manifest(out / "embeddings" / "manifest.csv")
    assert [r.status for r in rows] == ["ok", "failed", "ok", "failed", "ok"]
    for r in (rows[1], rows[3]):
        assert r.embedding_row == -1 and "non-finite or zero embedding" in r.error
    emb = np.load(out / "embeddings" / "embeddings.npy")
    assert emb.shape == (3, 4) and np.isfinite(emb).all() and (np.abs(emb).sum(axis=1) > 0).all()
    assert [r.embedding_row for r in rows if r.status == "ok"] == [0, 1, 2]


def test_a_name_holding_control_characters_is_printed_as_their_escapes(tmp_path, tiny_onnx, capsys):
    """A supplier's file named "\\x1b[2J....jpg" cleared the operator's screen when the summary named
    it, and U+202E showed the rest of its line reversed: both are printed as Python writes them."""
    import logging

    import main as cli

    shop = tmp_path / "sh\x1b[7mop"  # named in a warning, through logging
    shop.mkdir()
    (shop / "metadata.csv").write_text("file_name,price\nplain.jpg,3\nmissing.jpg,4\n")
    (shop / "\x1b[2J\x1b]0;PWNED\x07broken.jpg").write_bytes(b"not a picture")
    (shop / "gown\u202egpj.exe.jpg").write_bytes(assets.jpeg_bytes(40, 40, seed=1))
    (shop / "plain.jpg").write_bytes(assets.jpeg_bytes(40, 40, seed=2))
    try:
        code = cli.main(["--dataset", str(shop), "--onnx", str(tiny_onnx), "--output-dir", str(tmp_path / "out"),
                         "--max-result-images", "0"])
    finally:
        logging.basicConfig(force=True)  # main's handler writes to the captured stream: not to later tests
    said = capsys.readouterr()
    assert code == 3
    printed = said.out + said.err
    assert "\x1b" not in printed and "\x07" not in printed and "\u202e" not in printed
    assert "  - \\x1b[2J\\x1b]0;PWNED\\x07broken.jpg: not a recognized image format" in said.out
    assert "sh\\x1b[7mop/metadata.csv: 1 line(s) name no picture of the folder" in said.err


def test_a_usage_error_pointing_at_a_place_ends_with_its_caret(tmp_path, capsys):
    """A filter's error is three lines, the last the caret under the place: the --help hint is not glued onto it."""
    import main as cli

    assert cli.main(["--query-text", "red dress", "--filter", "category = dress", "--output-dir", str(tmp_path)]) == 2
    lines = capsys.readouterr().err.rstrip("\n").splitlines()
    said = "main.py: error: --filter: expected a value, found 'dress' (texts are quoted: 'dress') (at character 12)"
    assert lines == [said, "  category = dress", "             ^"]


@pytest.mark.parametrize("flags, says", [
    (["--output-dir", "TMP"], "complete shards are kept; run the same command again to resume"),
    (["--video_clip", "c", "--output-dir", "TMP"], "the clip starts over when run again"),
    (["--query-text", "red", "--output-dir", "TMP"], "builds no store, so there is nothing to resume"),
    # no shard of the update's complete (one that is: test_update): not "its complete shards are kept"
    (["--update", "--output-dir", "TMP"], "interrupted before the update completed a shard of its new photos: the "
                                          "store stays as it was"),
    (["--export-onnx", "--onnx", "TMP/m_int8.onnx"], "nothing was written"),
    (["--output-dir", "memory://b/run", "--work-dir", "TMP"],
     "what was not sent to memory://b/run yet (an upload stopped too) is sent by the next run from this working copy"),
])
def test_ctrl_c_says_what_each_mode_keeps(flags, says, tmp_path, monkeypatch, capsys):
    from pipeline import runner

    def interrupted(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "run", interrupted)
    assert cli.main([f.replace("TMP", str(tmp_path)) for f in flags]) == 130
    assert says in capsys.readouterr().err


def test_ctrl_c_after_the_store_was_finished_says_to_go_on_from_it(standard_run, tmp_path, monkeypatch, capsys):
    """Stopped while it drew the pictures or the report, a build's store is complete: the same
    command again would embed every photo again, so the message says to add --use-embeddings."""
    from pipeline import runner

    out, _ = standard_run
    shutil.copytree(out / "embeddings", tmp_path / "embeddings")

    def interrupted(cfg):  # stopped after this run wrote its store's sidecar (last)
        sidecar = cfg.store_dir / "embeddings.json"
        if sidecar.is_file() and sidecar.stat().st_mtime > 1e9 + 1:
            import time

            os.utime(sidecar, (time.time() + 1, time.time() + 1))  # after the run began, past the clock's grain
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "run", interrupted)
    for flags, says in (([], "add --use-embeddings to the same command to finish its neighbours, pictures and report"),
                        (["--use-embeddings"], "run it again to finish"),
                        (["--video_clip", "c"], "add --use-embeddings to the same command to play the clip")):
        assert cli.main(["--output-dir", str(tmp_path), *flags]) == 130
        assert f"interrupted: the gallery's store in {tmp_path / 'embeddings'} is complete; {says}" in \
            capsys.readouterr().err
    # a segmented build: --use-segmentation and --use-embedded-segment cannot be given together
    shutil.copytree(out / "embeddings", tmp_path / "embeddings_segment")
    assert cli.main(["--output-dir", str(tmp_path), "--use-segmentation"]) == 130
    assert (f"the gallery's store in {tmp_path / 'embeddings_segment'} is complete; replace --use-segmentation with "
            "--use-embedded-segment in the same command to finish its neighbours") in capsys.readouterr().err
    # a store older than this run (stopped while its model loaded, before it replaced that store): not this run's
    os.utime(tmp_path / "embeddings" / "embeddings.json", (1e9, 1e9))
    assert cli.main(["--output-dir", str(tmp_path)]) == 130
    assert "complete shards are kept; run the same command again to resume" in capsys.readouterr().err


def test_fp16_where_auto_finds_no_gpu_is_a_usage_error(tiny_clip, mixed_dataset, tmp_path, capsys):
    """--precision fp16 with --device auto on a machine without CUDA: exit 2 with the reason, as
    --device cpu --precision fp16 is refused (it was exit 1, an error of the run)."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("auto finds a GPU here")
    assert run("--dataset", mixed_dataset, "--model", tiny_clip, "--backend", "torch", "--precision", "fp16",
               "--output-dir", tmp_path) == 2
    assert "--precision fp16 needs --device cuda, a CUDA GPU (--device auto found none here)" in capsys.readouterr().err


def test_an_onnx_file_given_as_the_model_is_pointed_to_onnx(tiny_onnx, tmp_path, capsys):
    """--model FILE.onnx was read as a folder's config.json ("not a valid JSON file ... check the path")."""
    assert cli.main(["--model", str(tiny_onnx), "--output-dir", str(tmp_path), "--query-text", "red"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"--model {tiny_onnx} is an exported ONNX file: give it with --onnx {tiny_onnx}" in err
    from pipeline.catalog import Catalog
    from pipeline.errors import UsageError

    with pytest.raises(UsageError, match=r"model='.*tiny_int8_matmul.onnx' is an exported ONNX file: give it as onnx="):
        Catalog.open(tmp_path, model=str(tiny_onnx))


def test_help_says_what_each_option_takes():
    """argparse's own placeholders were the options' names (--seg-imgsz SEG_IMGSZ, --seg-conf SEG_CONF):
    nothing of pixels or of a range; and the usage block was 35 lines of every flag."""
    said = cli.build_parser().format_help()
    assert said.startswith("usage: python main.py [a mode flag] [options]")
    for shown in ("--seg-imgsz PIXELS", "--seg-conf 0-1", "--det-conf 0-1", "--top-k K", "--onnx FILE",
                  "--output-dir DIR_OR_URL", "--eval-models M1,M2"):
        assert shown in said, shown
    placeholders = set(re.findall(r"--[a-z-]+ ([A-Z][A-Z_]{2,})\b", said))
    assert not {p for p in placeholders if "_" in p and p not in ("ID_OR_PATH", "DIR_OR_URL")}, placeholders


def test_a_builds_flags_given_to_a_search_are_said_unused():
    """The build's command with a query added: --shard-rows, --fresh, --meta-columns or an --index kind
    were ignored without a word by a mode that reads the store as it was built."""
    from pipeline.config import config_from_flags
    from pipeline.modes import unused_build_flags

    parser = cli.build_parser()

    def said(*argv: str) -> str | None:
        argv_ = list(argv)
        cfg = config_from_flags(vars(parser.parse_args(argv_)), cli.explicit_options(parser, argv_))
        return unused_build_flags(cfg, lambda dests: cli._flag_names(parser, dests))

    assert said("--query-text", "a", "--shard-rows", "8", "--fresh") == (
        "--fresh, --shard-rows are a gallery run's, not used here: --query-image/--query-text reads the store as "
        "it was built")
    assert said("--serve", "--index", "hnsw").endswith("with the index beside it (or exactly, with --index none)")
    assert said("--shard-rows", "8") is None and said("--query-text", "a", "--index", "none") is None


def test_a_limit_that_cuts_the_dataset_short_is_said(mixed_dataset, tiny_onnx, tmp_path, capsys):
    """A 15,000-photo catalogue became a 10,000-photo gallery (the default --limit) without a word."""
    args = ["--dataset", str(mixed_dataset), "--onnx", str(tiny_onnx), "--max-result-images", "0"]
    assert cli.main([*args, "--output-dir", str(tmp_path / "cut"), "--limit", "5"]) in (0, 3)
    said = " ".join(capsys.readouterr().out.split())
    assert "--limit 5: the first 5 of the dataset's 24 rows (--limit 0 reads them all)" in said
    assert cli.main([*args, "--output-dir", str(tmp_path / "all"), "--limit", "0"]) == 3
    assert "--limit" not in capsys.readouterr().out


def test_the_same_gallery_command_run_again_says_it_embeds_everything_again(mixed_dataset, tiny_onnx, tmp_path,
                                                                            capsys):
    """The first command run a second time (where --use-embeddings was meant) embedded every photo
    again without a word; it says so, naming --use-embeddings, and not where flags differ or with --fresh."""
    args = ["--dataset", str(mixed_dataset), "--onnx", str(tiny_onnx), "--max-result-images", "0",
            "--output-dir", str(tmp_path / "g"), "--limit", "6"]
    assert cli.main(args) in (0, 3)
    assert "holds a complete store" not in capsys.readouterr().out
    assert cli.main(args) in (0, 3)
    said = " ".join(capsys.readouterr().out.split())
    assert (f"{tmp_path / 'g' / 'embeddings'} holds a complete store these flags made: this run embeds every photo "
            "again (--use-embeddings reuses it as it is") in said
    assert cli.main([*args, "--fresh"]) in (0, 3)
    assert "holds a complete store" not in capsys.readouterr().out
    assert cli.main([*args[:-1], "7"]) in (0, 3)  # another --limit: another store, built as asked
    assert "holds a complete store" not in capsys.readouterr().out
