"""The default invocation's own path: dataset and model from the Hugging Face Hub, served offline by a
stand-in on 127.0.0.1 (tests/hub_server.py). Each run is a fresh `python main.py` with HF_ENDPOINT
pointing at the stand-in, an empty HF_HOME and no offline flags, as a new user would run it."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.store import read_manifest
from tests import assets
from tests.hub_server import HubServer

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.subprocess  # every test here runs main.py in a fresh process
SHARDS, ROWS, GROUP = 3, 60, 20


def _configured(repo: Path, dataset: Path, configs: tuple[str, ...]) -> Path:
    """A dataset repository of several configurations, each one shard of `dataset` (its own rows),
    declared in its README as the hub reads them."""
    card = "---\nconfigs:\n"
    for shard, config in enumerate(configs):
        (repo / config).mkdir(parents=True)
        shutil.copy(dataset / "data" / f"train-{shard:05d}-of-{SHARDS:05d}.parquet", repo / config / "train-0.parquet")
        card += f"- config_name: {config}\n  data_files:\n  - split: train\n    path: {config}/train-*\n"
    (repo / "README.md").write_text(card + "---\n")
    return repo


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    base = tmp_path_factory.mktemp("hub")
    dataset = assets.write_hub_dataset(base / "deepfashion", shards=SHARDS, rows_per_shard=ROWS, row_group=GROUP)
    model = assets.save_tiny_clip(base / "fashion-clip")
    _, open_clip_repo = assets.save_tiny_open_clip(base / "open-clip")
    # as Marqo's repositories: a config.json naming the open_clip model, so the plain id loads it too
    (open_clip_repo / "config.json").write_text(json.dumps({"open_clip_model_name": "hf-hub:someone/tiny-openclip"}))
    multi = _configured(base / "multi", dataset, ("full", "small"))  # two configurations, neither the default
    dual = _configured(base / "dual", dataset, ("default", "small"))  # a default configuration and another
    broken = base / "broken"  # a model repo without weights
    broken.mkdir()
    (broken / "config.json").write_text((model / "config.json").read_text())
    repos = {
        ("dataset", "lirus18/deepfashion"): dataset,
        ("model", "patrickjohncyh/fashion-clip"): model,
        ("model", "someone/broken"): broken,
        ("dataset", "acme/multi"): multi,
        ("dataset", "acme/dual"): dual,
        ("model", "someone/tiny-openclip"): open_clip_repo,
    }
    with HubServer(repos) as server:
        server.dataset = dataset
        yield server


@pytest.fixture
def run_main(hub, tmp_path):
    """Run main.py in a fresh process in tmp_path (so the default onnx/ and outputs land there)."""
    env = {k: v for k, v in os.environ.items() if not k.endswith("_OFFLINE")}
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf-home"), PYTHONPATH=str(ROOT))

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, str(ROOT / "main.py"), *args],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )

    return run


def _shard(hub, k: int) -> Path:
    return hub.dataset / "data" / f"train-{k:05d}-of-{SHARDS:05d}.parquet"


def _column_ranges(path: Path, groups: list[int], columns: tuple[str, ...]) -> list[tuple[int, int]]:
    """Byte ranges [start, end] of the column chunks of `columns` (leaf paths start with the name) in `groups`."""
    md = pq.ParquetFile(path).metadata
    out = []
    for g in groups:
        rg = md.row_group(g)
        for c in range(rg.num_columns):
            col = rg.column(c)
            if col.path_in_schema.split(".")[0] in columns:
                start = (
                    col.dictionary_page_offset
                    if col.has_dictionary_page and col.dictionary_page_offset
                    else col.data_page_offset
                )
                out.append((start, start + col.total_compressed_size - 1))
    return out


def _fetched_ranges(hub, path: Path) -> list[tuple[int, int]]:
    size = path.stat().st_size
    out = []
    for r in hub.log:
        if r.method == "GET" and r.path.endswith(path.name) and r.status == 206:
            a, b = r.range.split("=")[1].split("-")
            out.append((int(a), min(int(b), size - 1)) if a else (size - int(b), size - 1))
        elif r.method == "GET" and r.path.endswith(path.name):
            out.append((0, size - 1))
    return out


def test_default_run_fetches_only_what_the_limit_needs(hub, run_main, tmp_path):
    hub.reset()
    r = run_main("--limit", "10", "-q")
    assert r.returncode == 0, r.stderr
    rows = read_manifest(tmp_path / "embeddings" / "manifest.csv")
    assert [x.source_row for x in rows] == list(range(10)) and all(x.status == "ok" for x in rows)
    assert rows[0].source == "0.jpg"  # the image cell's own path
    assert len(list((tmp_path / "retrieval_results").glob("*_matches.jpg"))) == 10
    assert (tmp_path / "outputs" / "distance_heatmap.png").is_file()
    side = json.loads((tmp_path / "embeddings" / "embeddings.json").read_text())
    assert (
        side["identity"]["model"] == "patrickjohncyh/fashion-clip"
        and side["source"]["dataset"] == "lirus18/deepfashion"
    )
    first = _shard(hub, 0)
    assert hub.bytes_for(first.name) < first.stat().st_size / 2
    assert hub.bytes_for(_shard(hub, 1).name) == 0 and hub.bytes_for(_shard(hub, 2).name) == 0
    # Every byte fetched from the shard is the footer, the image column or the caption (metadata) of
    # row group 0: never the openpose or cloth columns, never row groups 1 and 2.
    size = first.stat().st_size
    footer = size - 8 - int.from_bytes(first.read_bytes()[-8:-4], "little")
    allowed = _column_ranges(first, [0], ("image", "caption")) + [(footer, size - 1)]
    for a, b in _fetched_ranges(hub, first):
        assert any(lo <= a and b <= hi for lo, hi in allowed), (a, b, allowed)
    images = sum(b - a + 1 for a, b in _column_ranges(first, [0], ("image",)))
    captions = sum(b - a + 1 for a, b in _column_ranges(first, [0], ("caption",)))
    # the metadata read fetches the footer once more
    assert hub.bytes_for(first.name) <= 2 * images + captions + 2 * (size - footer)


def test_a_shard_that_fails_mid_read_is_named_with_how_to_go_on(hub, run_main, tmp_path):
    """The hub's files are read lazily, range by range: a shard gone (or a connection cut) after the
    listing failed the run as 'unexpected RemoteEntryNotFoundError', often without the file."""
    second = f"data/{_shard(hub, 1).name}"
    hub.failing.add(second)
    try:
        r = run_main("--limit", "90", "-q")
    finally:
        hub.failing.discard(second)
    assert r.returncode == 1, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: reading hf://datasets/lirus18/deepfashion") and second in last, last
    assert "run the same command again (a build resumes from its last complete shard)" in last
    assert "unexpected" not in r.stderr


def test_a_dataset_of_several_configurations_is_read_by_the_one_named(hub, run_main, tmp_path):
    """Without --config, a dataset of several configurations and no default is refused naming them (it
    was 'cannot open ... (ValueError: Config name is missing.)', with advice for going offline); with
    it, that configuration's rows are read and recorded; an unknown one is named."""
    import pyarrow.parquet as pq

    r = run_main("--dataset", "acme/multi", "--limit", "4", "-q")
    assert r.returncode == 1
    last = r.stderr.strip().splitlines()[-1]
    assert last == ("error: dataset 'acme/multi' has several configurations ['full', 'small'] and no default one: "
                    "choose one with --config NAME"), last
    r = run_main("--dataset", "acme/multi", "--config", "nope", "--limit", "4", "-q")
    assert r.returncode == 1 and "has no configuration 'nope'; it has ['full', 'small']" in r.stderr
    r = run_main("--dataset", "acme/multi", "--config", "small", "--limit", "4", "-q", "--max-result-images", "0")
    assert r.returncode == 0, r.stderr
    cells = pq.read_table(hub.dataset / "data" / f"train-00001-of-{SHARDS:05d}.parquet").column("image").to_pylist()
    want = [hashlib.sha256(c["bytes"]).hexdigest() for c in cells[:4]]
    assert [m.source_sha256 for m in read_manifest(tmp_path / "embeddings" / "manifest.csv")] == want
    side = json.loads((tmp_path / "embeddings" / "embeddings.json").read_text())
    assert side["source"]["config"] == "small"
    r = run_main("--dataset", "acme/multi", "--config", "full", "--use-embeddings", "-q")  # another configuration
    assert r.returncode == 1 and "config: cache has 'small', asked for 'full'" in r.stderr
    assert "To reuse it, ask for what made it: --config small" in r.stderr  # not "rebuild it"
    r = run_main("--evaluate", "--dataset", "acme/multi", "--config", "small", "--limit", "6", "-q")
    assert r.returncode == 0, r.stderr
    evaluation = json.loads((tmp_path / "outputs" / "evaluation.json").read_text())
    assert (evaluation["dataset"], evaluation["config"]) == ("acme/multi", "small")
    # an update without --config reads the store's configuration (not the default one's rows into a store of
    # another), as it takes every dataset setting no flag gives; one named otherwise is refused
    out = tmp_path / "dual"
    r = run_main("--dataset", "acme/dual", "--config", "small", "--limit", "4", "-q", "--output-dir", str(out))
    assert r.returncode == 0, r.stderr
    r = run_main("--dataset", "acme/dual", "--limit", "4", "--output-dir", str(out), "--update")
    assert r.returncode == 0, r.stderr
    assert "updated with the store's own --config small (not given)" in " ".join(r.stdout.split())
    assert [m.source_sha256 for m in read_manifest(out / "embeddings" / "manifest.csv")] == want  # small's rows
    assert json.loads((out / "embeddings" / "embeddings.json").read_text())["source"]["config"] == "small"
    r = run_main("--dataset", "acme/dual", "--config", "small", "--limit", "4", "-q", "--output-dir", str(out),
                 "--update")
    assert r.returncode == 0, r.stderr
    assert [m.source_sha256 for m in read_manifest(out / "embeddings" / "manifest.csv")] == want  # shard 1's still
    # and a store of the default configuration is not updated from another one
    plain = tmp_path / "dual-default"
    r = run_main("--dataset", "acme/dual", "--limit", "4", "-q", "--output-dir", str(plain))
    assert r.returncode == 0, r.stderr
    r = run_main("--dataset", "acme/dual", "--config", "small", "--limit", "4", "-q", "--output-dir", str(plain),
                 "--update")
    assert r.returncode == 1 and "was built from acme/dual's default configuration: update without --config" in (
        r.stderr)


def test_limit_reads_the_row_groups_it_needs(hub, run_main, tmp_path):
    hub.reset()
    r = run_main("--limit", "70", "-q", "--max-result-images", "0")
    assert r.returncode == 0, r.stderr
    assert len(read_manifest(tmp_path / "embeddings" / "manifest.csv")) == 70
    first, second = _shard(hub, 0), _shard(hub, 1)
    for path, groups in ((first, [0, 1, 2]), (second, [0])):
        size = path.stat().st_size
        footer = size - 8 - int.from_bytes(path.read_bytes()[-8:-4], "little")
        allowed = _column_ranges(path, groups, ("image", "caption")) + [(footer, size - 1)]
        for a, b in _fetched_ranges(hub, path):
            assert any(lo <= a and b <= hi for lo, hi in allowed), (path.name, a, b)
    assert hub.bytes_for(_shard(hub, 2).name) == 0


def test_export_from_the_hub_calibrates_on_the_default_dataset_then_runs(hub, run_main, tmp_path):
    r = run_main("--export-onnx")
    assert r.returncode == 0, r.stderr
    assert "calibrated on 64 and verified on 32 rows of lirus18/deepfashion" in r.stdout
    assert (tmp_path / "onnx" / "fashion_clip_image_int8_matmul.onnx").is_file()
    r = run_main("--limit", "12", "-q")  # --backend auto now finds the ONNX file
    assert r.returncode == 0, r.stderr
    side = json.loads((tmp_path / "embeddings" / "embeddings.json").read_text())
    assert side["identity"]["backend"] == "onnx" and side["count"] == 12
    r = run_main("--query-text", "red dress", "-q")
    assert r.returncode == 0, r.stderr
    with open(tmp_path / "retrieval_results" / "queries" / "query_results.csv") as f:
        assert len(list(csv.DictReader(f))) == 5


def test_an_open_clip_hub_model_is_one_model_by_either_name(hub, run_main, tmp_path):
    """Marqo's repositories load as `hf-hub:ORG/NAME` and as the plain id (their config.json names the
    open_clip model): one model, recorded as open_clip's form, so a store made under one name is
    reused and updated under the other, and its ONNX export is that model's."""
    both = ("hf-hub:someone/tiny-openclip", "someone/tiny-openclip")
    r = run_main("--model", both[1], "--backend", "torch", "--limit", "6", "--max-result-images", "0", "-q")
    assert r.returncode == 0, r.stderr
    side = json.loads((tmp_path / "embeddings" / "embeddings.json").read_text())
    assert side["identity"]["family"] == "open_clip" and side["identity"]["model"] == both[0]
    r = run_main("--model", both[0], "--backend", "torch", "--use-embeddings", "--limit", "6",
                 "--max-result-images", "0", "-q")
    assert r.returncode == 0, r.stderr
    r = run_main("--model", both[0], "--backend", "torch", "--update", "--limit", "9", "--max-result-images", "0", "-q")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "embeddings" / "embeddings.json").read_text())["count"] == 9


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--dataset", "nobody/nothing"],
            "error: cannot open dataset 'nobody/nothing' from the Hugging Face hub (DatasetNotFoundError",
        ),
        # one word: perhaps a local folder, mistyped or looked for from another folder
        (["--dataset", "catalogue"], "accessed.), and there is no folder or file 'catalogue' in "),
        (["--split", "test"], "has splits ['train'], not 'test'"),
        (["--model", "nobody/nomodel", "--backend", "torch"], "error: cannot load model 'nobody/nomodel'"),
        (["--model", "someone/broken", "--backend", "torch"], "error: cannot load model 'someone/broken'"),
    ],
)
def test_missing_repo_or_file_is_one_line(args, message, run_main):
    r = run_main(*args, "--limit", "3", "-q")
    assert r.returncode == 1
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_offline_the_default_run_names_both_assets_it_lacks_at_once(tmp_path, monkeypatch, capsys):
    """Offline, `python main.py` stopped on the dataset ("pass a local copy"), and once a folder was
    given, 18 s later on the model: one message names both, and that a folder of one's own pictures
    is a dataset."""
    import main as cli

    monkeypatch.chdir(tmp_path)  # no onnx/ here: the default model comes from the hub too
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert cli.main(["--output-dir", str(tmp_path / "o")]) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert ("Without network access, pass a local copy with --dataset DIR (a folder of your own pictures will do); "
            "this run's --model patrickjohncyh/fashion-clip comes from the hub too: pass a local one with --model DIR"
            ) in err
