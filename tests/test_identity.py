"""Typed identities: what made the vectors and what the gallery was made from, compared field by field,
and the store's format version (refused with what to do; format 1 upgraded by an explicit step)."""

from __future__ import annotations

import json
import re
from dataclasses import fields

import pytest

import main as cli
from pipeline.errors import CacheMismatchError
from pipeline.identity import STORE_FORMAT, GallerySource, VectorIdentity, differences, said_value
from pipeline.store import SIDECAR_FILE, load_cache
from pipeline.store import main as store_main
from tests import assets

MADE = VectorIdentity(backend="onnx", family="siglip", model="/m", model_sha256="a", onnx_sha256="b",
                      precision="onnx-int8-static", preprocess={"crop_size": 224, "mean": [0.5]}, dim=512, pixels="pil",
                      runtime="onnxruntime")
SOURCE = GallerySource(kind="segment", dataset="/d", split="train", limit=None, image_column="image", id_column="sku",
                       config="women", seg_model="y.pt", seg_backend="auto", seg_conf=0.25, seg_imgsz=640,
                       keep_unsegmented=False, max_persons=10, seg_weights="e" * 64)
OTHER = {str: "other", int: 7, float: 0.5, bool: True}


@pytest.mark.parametrize("name", [f.name for f in fields(VectorIdentity)])
def test_every_identity_field_that_differs_is_named(name):
    value = {"crop_size": 256, "mean": [0.5]} if name == "preprocess" else OTHER[type(getattr(MADE, name))]
    # a model named otherwise with the same weights is the same model (below): a hub id names no weights
    asked = MADE.asks(**{name: value}, **({"model_sha256": None} if name == "model" else {}))
    problems = differences(asked, MADE)
    shown = repr(256 if name == "preprocess" else value)
    assert len(problems) == 1 and problems[0].startswith(name) and shown in problems[0]
    assert differences(MADE, MADE) == [] and differences(VectorIdentity(backend="onnx"), MADE) == []


@pytest.mark.parametrize("name", [f.name for f in fields(GallerySource)])
def test_every_source_field_that_differs_is_named(name):
    current = getattr(SOURCE, name)
    value = 100 if name == "limit" else OTHER[type(current)]
    asked = SOURCE.asks(**{name: value})
    problems = differences(asked, SOURCE)
    assert len(problems) == 1 and problems[0].startswith(
        f"{name}: cache has {said_value(name, current)}, asked for {value!r}")
    assert differences(asked, SOURCE, only=frozenset({"kind"} - {name})) == []  # a field not asked is not compared


def test_a_field_recorded_since_a_later_version_is_not_compared_with_a_store_that_lacks_it():
    """A store made before its weights folder's kind was hashed (sharded weights) or before the id
    column was recorded is compared as it was then; one that records them is compared on them."""
    from dataclasses import replace

    old_identity, old_source = replace(MADE, model_sha256=None), replace(SOURCE, id_column=None, seg_weights=None)
    assert differences(MADE, old_identity) == [] and differences(SOURCE, old_source) == []
    assert differences(replace(MADE, model_sha256="c"), MADE) == ["model_sha256: cache has 'a', asked for 'c'"]
    assert differences(replace(SOURCE, id_column="alt"), SOURCE)[0].startswith("id_column: cache has 'sku'")
    # another field a store lacks is still a difference: a store without a configuration is of the default one
    assert differences(MADE, replace(MADE, dim=None)) == ["dim: cache has '<absent>', asked for 512"]
    assert differences(SOURCE, replace(SOURCE, config=None)) == [
        "config: cache has the default configuration, asked for 'women'"]


def test_a_model_folder_is_known_by_its_weights():
    """A local folder's model is the same model moved or copied elsewhere, with the same weights
    (their sha256); not with other weights; a hub id (no weights hashed) is known by its id."""
    moved = MADE.asks(model="/elsewhere")
    assert differences(moved, MADE) == []
    assert differences(moved.asks(model_sha256="c"), MADE) == [
        "model: cache has '/m', asked for '/elsewhere'", "model_sha256: cache has 'a', asked for 'c'"]
    hub = MADE.asks(model="org/model", model_sha256=None)
    assert differences(hub, MADE.asks(model_sha256=None)) == ["model: cache has '/m', asked for 'org/model'"]


def test_limit_none_is_every_row_and_is_compared():
    """limit None (every row) is a value: a gallery of 100 rows is not one of every row."""
    assert differences(SOURCE, SOURCE.asks(limit=100)) == ["limit: cache has 100, asked for every row (--limit 0)"]
    standard = GallerySource(kind="standard", dataset="/d", split="train", limit=None, image_column="image")
    assert "seg_model" not in standard.to_json() and standard.to_json()["limit"] is None
    assert "max_persons" not in standard.asks(max_persons=10).to_json()  # a segmented gallery's setting only
    # No id column: no key (a run or store made before it was recorded has the same JSON, and resumes)
    assert "id_column" not in standard.to_json() and standard.asks(id_column="sku").to_json()["id_column"] == "sku"


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_clip):
    tmp = tmp_path_factory.mktemp("identity")
    ds = assets.write_parquet_dataset(tmp / "ds", [assets.jpeg_bytes(50, 60, seed=i) for i in range(5)])
    out = tmp / "out"
    assert cli.main(["--dataset", str(ds), "--model", str(tiny_clip), "--backend", "torch", "--output-dir", str(out),
                     "--max-result-images", "0", "-q"]) == 0
    return out


def _rewrite(path, change):
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_store_records_format_and_typed_identity(store):
    side = json.loads((store / "embeddings" / SIDECAR_FILE).read_text())
    assert side["format"] == STORE_FORMAT == 2
    assert side["identity"]["pixels"] == "pil" and side["identity"]["backend"] == "torch"
    assert side["source"]["kind"] == "standard" and "seg_model" not in side["source"]


def test_format_1_store_is_refused_then_upgraded_by_the_explicit_step(store, tiny_clip, tmp_path, capsys):
    import shutil

    out = tmp_path / "old"
    shutil.copytree(store, out)
    sidecar = out / "embeddings" / SIDECAR_FILE
    _rewrite(sidecar, lambda d: (d.update(format=1), d["identity"].pop("pixels")))  # as format 1 wrote it
    argv = ["--use-embeddings", "--model", str(tiny_clip), "--backend", "torch", "--output-dir", str(out), "-q",
            "--max-result-images", "0"]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert "store format 1" in err and f"python -m pipeline.store upgrade {out / 'embeddings'}" in err
    assert store_main(["upgrade", str(out / "embeddings")]) == 0
    assert "upgraded to store format 2" in capsys.readouterr().out
    upgraded = json.loads(sidecar.read_text())
    assert upgraded["format"] == 2 and upgraded["identity"]["pixels"] == "pil"
    assert cli.main(argv) == 0
    assert store_main(["upgrade", str(out / "embeddings")]) == 0
    assert "already store format 2" in capsys.readouterr().out


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d.update(format=3), "store format 3, this version reads 2"),
        (lambda d: d["identity"].update(colour="red"), "unknown VectorIdentity field(s) ['colour']"),
        (lambda d: d["source"].update(shop="x"), "unknown GallerySource field(s) ['shop']"),
    ],
)
def test_sidecars_this_version_cannot_read_are_refused(store, tmp_path, change, message):
    import shutil

    root = tmp_path / "embeddings"
    shutil.copytree(store / "embeddings", root)
    _rewrite(root / SIDECAR_FILE, change)
    with pytest.raises(CacheMismatchError, match=re.escape(message)):
        load_cache(root, store / "images", identity=None)
    assert store_main(["upgrade", str(root)]) == 1  # "already current" only for a sidecar that reads
    unchanged = (root / SIDECAR_FILE).read_text()
    _rewrite(root / SIDECAR_FILE, lambda d: d.update(format=1))  # a format-1 store that cannot be upgraded
    if "field" in message:
        before = (root / SIDECAR_FILE).read_bytes()
        assert store_main(["upgrade", str(root)]) == 1
        assert (root / SIDECAR_FILE).read_bytes() == before  # left as it was, still saying format 1
    assert unchanged


def test_a_segmented_cache_made_with_another_max_persons_is_refused(tiny_onnx, tmp_path, monkeypatch, capsys):
    """--max-persons changes which crops a segmented gallery holds: a cache or an unfinished run made with
    another cap is refused, naming it; a store made before the cap (no max_persons) is refused too."""
    import numpy as np

    from pipeline import galleries
    from pipeline.config import config_from_flags
    from pipeline.galleries import gallery_source
    from pipeline.persons import Person, Segmenter
    from pipeline.store import run_params

    class FivePersons(Segmenter):
        def segment(self, images_rgb):
            h, w = images_rgb[0].shape[:2]
            mask = np.ones((h, w), bool)
            return [[Person(np.array([0, 0, w, h], np.float32), 0.9 - 0.1 * p, mask) for p in range(5)]
                    for _ in images_rgb]

    monkeypatch.setattr(galleries, "make_segmenter", lambda spec, device: FivePersons())
    ds = assets.write_parquet_dataset(tmp_path / "ds", [assets.jpeg_bytes(40, 60, seed=i) for i in range(3)])
    out = tmp_path / "out"
    common = ["--onnx", str(tiny_onnx), "--output-dir", str(out), "-q", "--max-result-images", "0"]
    assert cli.main(["--use-segmentation", "--dataset", str(ds), "--max-persons", "2", *common]) == 0
    sidecar = out / "embeddings_segment" / SIDECAR_FILE
    assert json.loads(sidecar.read_text())["source"]["max_persons"] == 2
    assert cli.main(["--use-embedded-segment", "--max-persons", "2", *common]) == 0
    capsys.readouterr()
    assert cli.main(["--use-embedded-segment", "--max-persons", "3", *common]) == 1
    assert "max_persons: cache has 2, asked for 3" in capsys.readouterr().err
    # an unfinished run's shards are resumed only with the same cap: it is part of what a resume compares
    asked = config_from_flags({"use_segmentation": True, "max_persons": 3, "dataset": str(ds)})
    assert run_params(gallery_source(asked), MADE, 32, 512)["source"]["max_persons"] == 3
    # a store made before the cap kept every person: not what a capped request asks for
    _rewrite(sidecar, lambda d: d["source"].pop("max_persons"))
    assert cli.main(["--use-embedded-segment", "--max-persons", "10", *common]) == 1
    assert "max_persons: cache has every person (made before --max-persons), asked for 10" in capsys.readouterr().err


def test_an_open_clip_hub_model_recorded_by_its_plain_id_reads_as_open_clips_form():
    """Stores made before recorded Marqo-FashionSigLIP by the name it was given; either name is one
    model now (backends.hub_reference), while a plain id of another family and a folder stay as they are."""
    marqo = VectorIdentity.from_json({"backend": "torch", "family": "open_clip", "model": "Marqo/marqo-fashionSigLIP"},
                                     "test")
    assert marqo.model == "hf-hub:Marqo/marqo-fashionSigLIP"
    named = VectorIdentity.from_json({"backend": "torch", "family": "open_clip",
                                      "model": "hf-hub:Marqo/marqo-fashionSigLIP"}, "test")
    assert differences(named, marqo) == []
    laion = VectorIdentity.from_json({"backend": "torch", "family": "clip", "model": "laion/CLIP-ViT-B-32"}, "test")
    assert laion.model == "laion/CLIP-ViT-B-32"
    folder = VectorIdentity.from_json({"backend": "torch", "family": "open_clip", "model": "/models/marqo"}, "test")
    assert folder.model == "/models/marqo"


def test_an_onnx_store_records_openvino_and_is_onnxruntime_s_where_it_records_no_runtime():
    """onnxruntime, the one runtime before OpenVINO, is left out of what a store records (its
    sidecar reads as before), and a store that records none was made by it; the comparison holds it."""
    ort, ov = MADE, MADE.asks(runtime="openvino")
    assert "runtime" not in ort.to_json() and ov.to_json()["runtime"] == "openvino"
    assert VectorIdentity.from_json(ort.to_json(), "test") == ort  # read back: onnxruntime's
    assert VectorIdentity.from_json(ov.to_json(), "test") == ov
    assert differences(ov, ort) == ["runtime: cache has 'onnxruntime', asked for 'openvino'"]
    assert differences(ort, ov) == ["runtime: cache has 'openvino', asked for 'onnxruntime'"]
    torch = VectorIdentity(backend="torch", model="/m")
    assert VectorIdentity.from_json(torch.to_json(), "test").runtime is None  # no runtime: no ONNX file


def test_an_onnx_request_against_a_torch_store_names_the_backend_not_a_runtime():
    """A torch store records no runtime: against it an ONNX request differs by its backend and file,
    not by a runtime (onnxruntime against an absent one read as onnxruntime)."""
    torch = VectorIdentity(backend="torch", model="/m", pixels="pil")
    for runtime in ("onnxruntime", "openvino"):
        asked = VectorIdentity(backend="onnx", onnx_sha256="ab", pixels="pil", runtime=runtime)
        problems = differences(asked, torch)
        assert problems and not any(p.startswith("runtime") for p in problems), problems
        assert any(p.startswith("backend: cache has 'torch', asked for 'onnx'") for p in problems)
