"""Where things are looked for, the run says so: the ONNX file behind a fallback, the flags that made a
refused cache, building a cache first, and an unreachable hub, found once and fast."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import main as cli
import onnx
from pipeline.config import config_from_flags, onnx_fallback
from tests import assets
from tests.helpers import free_port, run

ROOT = Path(__file__).resolve().parents[1]


def test_the_fallback_to_the_hub_model_names_the_onnx_file_looked_for(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    note = onnx_fallback(config_from_flags({}))
    looked = tmp_path / "onnx" / "fashion_clip_image_int8_matmul.onnx"
    assert note is not None
    assert note.startswith(f"no ONNX file at {looked} (the default --onnx, from the current folder)")
    assert "using the transformers model patrickjohncyh/fashion-clip instead" in note
    project = ROOT / "onnx" / "fashion_clip_image_int8_matmul.onnx"
    assert (f"pass --onnx {project}" if project.is_file() else "make one with --export-onnx") in note
    # No fallback to speak of: a file there, a backend or a model the user chose.
    looked.parent.mkdir()
    looked.write_bytes(b"x")
    assert onnx_fallback(config_from_flags({})) is None
    looked.unlink()
    assert onnx_fallback(config_from_flags({"backend": "torch"})) is None
    assert onnx_fallback(config_from_flags({"model": "m"}, explicit=frozenset({"model"}))) is None


def test_a_model_typed_is_used_rather_than_the_default_file_of_another_model(tiny_clip, tiny_onnx, tmp_path,
                                                                               monkeypatch):
    """With backend auto, the file at the default --onnx is used when it exists; but a --model the
    user typed is the model they want: the file is used only when it was exported from that model,
    otherwise the model itself runs, and the run says why."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "onnx").mkdir()
    shutil.copy(tiny_onnx, tmp_path / "onnx" / "fashion_clip_image_int8_matmul.onnx")
    other = tmp_path / "other-model"
    other.mkdir()
    typed = frozenset({"model"})
    cfg = config_from_flags({"model": str(other)}, explicit=typed)
    assert cfg.embedder.resolve_backend() == "torch"
    assert onnx_fallback(cfg) == (
        f"--model {other}: the ONNX file at onnx/fashion_clip_image_int8_matmul.onnx (the default --onnx) was "
        f"exported from {tiny_clip.resolve()}, so the run uses the model you named itself; pass --onnx FILE for an "
        "export of it")
    same = config_from_flags({"model": str(tiny_clip)}, explicit=typed)
    assert same.embedder.resolve_backend() == "onnx" and onnx_fallback(same) is None  # its own export
    assert config_from_flags({}).embedder.resolve_backend() == "onnx"  # no --model typed: the file, as before
    # --backend onnx, or --onnx typed, keep the file as asked (the identity check then speaks)
    assert config_from_flags({"model": str(other), "backend": "onnx"}, explicit=typed | {"backend"}
                             ).embedder.resolve_backend() == "onnx"


@pytest.fixture
def two_onnx(tiny_onnx, tmp_path) -> tuple[Path, Path]:
    """The tiny export, and a copy whose bytes differ (another metadata value): two files, two sha256s."""
    a = Path(shutil.copy(tiny_onnx, tmp_path / "a_int8.onnx"))
    model = onnx.load(str(a))
    model.doc_string = "another export"
    b = tmp_path / "models" / "b_int8.onnx"
    b.parent.mkdir()
    onnx.save(model, str(b))
    shutil.copy(a, b.parent / "a_int8.onnx")  # the folder of the asked file holds the one that made the cache
    return b.parent / "a_int8.onnx", b


def test_a_refused_cache_names_the_flags_that_made_it(two_onnx, mixed_dataset, tmp_path, capsys):
    made_with, asked = two_onnx
    out = tmp_path / "out"
    base = ["--dataset", mixed_dataset, "--output-dir", out, "--max-result-images", "0"]
    assert run(*base, "--onnx", made_with, "--limit", "8") in (0, 3)
    capsys.readouterr()
    assert run(*base, "--onnx", asked, "--limit", "6", "--use-embeddings") == 1
    err = capsys.readouterr().err
    assert "onnx_sha256: cache has" in err and "limit: cache has 8, asked for 6" in err
    assert f"To reuse it, ask for what made it: --onnx {made_with} --limit 8; or rebuild it: run the same command " \
           "without --use-embeddings" in err


def test_using_a_cache_that_was_never_built_says_to_build_it_first(tiny_onnx, tmp_path, capsys):
    out = tmp_path / "new"
    assert run("--onnx", tiny_onnx, "--output-dir", out, "--use-embeddings") == 1
    err = capsys.readouterr().err
    assert f"no complete cache in {out / 'embeddings'}" in err
    assert "Build it first: run the same command without --use-embeddings" in err
    assert run("--onnx", tiny_onnx, "--output-dir", out, "--use-embedded-segment") == 1
    assert (f"Build it first: run the same command with --use-segmentation in place of --use-embedded-segment (it "
            f"writes {out / 'embeddings_segment'}); later runs give --use-embedded-segment to reuse it.") \
        in capsys.readouterr().err
    assert not out.exists()


def test_a_search_mode_is_told_the_gallery_run_that_builds_its_store(tiny_onnx, tiny_clip, mixed_dataset, tmp_path,
                                                                      capsys, monkeypatch):
    """--query-*, --serve and --export have no cache flag to leave out: the way to a store is a gallery
    run, named; an ONNX store is asked for by its file (its model and recorded precision are not
    flags: `--precision onnx-int8-...` is no --precision choice), found even where the backend was
    the only difference."""
    out = tmp_path / "new"
    assert run("--onnx", tiny_onnx, "--output-dir", out, "--query-text", "a red dress") == 1
    err = capsys.readouterr().err
    # the gallery-making flags the search was typed with go into the command: it can be pasted as it is
    assert f"Build it first with a gallery run: python main.py --onnx {tiny_onnx} --output-dir {out} (plus the " \
           f"--dataset to make it with, where not the default; it writes {out / 'embeddings'}), then search it." in err
    assert "without --use-embeddings" not in err
    # said before any model loads: with no model flag, not the default hub model's failure to load
    # offline (online, a download of it first)
    for mode in (("--query-text", "a red dress"), ("--serve", "--port", str(free_port()))):
        assert run("--output-dir", out, *mode) == 1
        err = capsys.readouterr().err
        assert f"Build it first with a gallery run: python main.py --output-dir {out} (with the --dataset and " \
               "--model or --onnx to make it with" in err and "cannot load model" not in err
    assert run("--onnx", tiny_onnx, "--output-dir", out, "--query-text", "a red dress", "--use-embedded-segment") == 1
    err = capsys.readouterr().err  # with a cache flag too: leaving it out would build nothing either
    assert f"Build it first with a gallery run: python main.py --use-segmentation --onnx {tiny_onnx} --output-dir " \
           f"{out} (plus the --dataset to make it with, where not the default; it writes " \
           f"{out / 'embeddings_segment'})" in err
    assert run("--dataset", mixed_dataset, "--onnx", tiny_onnx, "--output-dir", out, "--max-result-images", "0") == 3
    capsys.readouterr()
    (tmp_path / "elsewhere" / "onnx").mkdir(parents=True)
    shutil.copy(tiny_onnx, tmp_path / "elsewhere" / "onnx" / "made.onnx")
    monkeypatch.chdir(tmp_path / "elsewhere")  # its ./onnx holds the file that made the store
    assert run("--model", tiny_clip, "--backend", "torch", "--output-dir", out, "--query-text", "a red dress") == 1
    err = capsys.readouterr().err
    assert "backend: cache has 'onnx', asked for 'torch'" in err
    remedy = err.strip().splitlines()[-1]
    assert remedy.startswith("To reuse it, ask for what made it: --backend onnx --onnx onnx/made.onnx; or "), remedy
    reuse = remedy.split("; or ")[0]
    assert "--precision" not in reuse and "--model" not in reuse
    # the store's dataset with the flags typed: the typed alone would rebuild from the default hub dataset
    assert remedy.endswith(f"rebuild it with a gallery run: python main.py --dataset {mixed_dataset} --model "
                           f"{tiny_clip} --backend torch --output-dir {out} (the old store is replaced; change what "
                           "you want made otherwise)."), remedy
    from tests import assets

    (tmp_path / "look.jpg").write_bytes(assets.jpeg_bytes(40, 60))
    assert run("--backend", "onnx", "--onnx", "onnx/made.onnx", "--output-dir", out, "--query-image",
               tmp_path / "look.jpg") == 0


def test_a_store_of_a_model_folder_is_told_its_model_too(tiny_onnx, tiny_clip, mixed_dataset, tmp_path, capsys):
    """A store made by transformers from a model folder, searched with the ONNX file (the default
    --backend auto takes it): the way back names --model, which the request left at its default (a
    hub id this machine may not reach), beside --backend."""
    out = tmp_path / "made-by-torch"
    assert run("--dataset", mixed_dataset, "--model", tiny_clip, "--backend", "torch", "--output-dir", out,
               "--max-result-images", "0") == 3
    capsys.readouterr()
    assert run("--onnx", tiny_onnx, "--output-dir", out, "--query-text", "a red dress") == 1
    remedy = capsys.readouterr().err.strip().splitlines()[-1]
    assert remedy.startswith(f"To reuse it, ask for what made it: --backend torch --model {tiny_clip}"), remedy
    capsys.readouterr()
    assert cli.main(["--backend", "torch", "--model", str(tiny_clip), "--output-dir", str(out),
                     "--query-text", "a red dress"]) == 0
    # the summary says what made the vectors searched (--backend auto could have taken either)
    assert f"\nmodel:    {Path(tiny_clip).resolve()} (torch, fp32)\n" in capsys.readouterr().out


def test_changed_weights_are_told_to_rebuild_not_to_reuse(tmp_path):
    """Only the model's weights changed (model_sha256), or only the --limit: the flags given already
    name the model, so no --model is suggested (it could not reuse the store, or changes nothing)."""
    from pipeline.identity import GallerySource, VectorIdentity
    from pipeline.remedy import reuse_or_rebuild

    made = VectorIdentity(backend="torch", family="clip", model="/models/clip", model_sha256="a" * 64, precision="fp32")
    source = GallerySource(kind="standard", dataset="/data/shop", split="train", limit=100, image_column="image")
    typed = ("--dataset", "/data/shop", "--model", "/models/clip", "--limit", "100")
    said = reuse_or_rebuild(["model_sha256"], made, source, False, None, typed=typed)
    assert said.startswith("Rebuild it: run the same command without --use-embeddings") and "--model" not in said
    said = reuse_or_rebuild(["limit"], made, source, False, None, typed=typed[:4])
    assert said.startswith("To reuse it, ask for what made it: --limit 100; or ") and "--model" not in said
    # a segmented store: leaving out --use-embedded-segment alone would build the gallery of whole photos
    said = reuse_or_rebuild(["model_sha256"], made, source, True, None, typed=(*typed, "--precision", "fp32"))
    assert said == ("Rebuild it: run the same command with --use-segmentation in place of --use-embedded-segment "
                    "(the old store is replaced).")
    # a cache command that left out the dataset and model (they are the store's): the rebuild adds them, as
    # without them it would read the default dataset with the default model and replace this store with those
    said = reuse_or_rebuild(["seg_conf"], made, source, True, None, typed=("--seg-conf", "0.9"))
    assert said == ("Rebuild it: run the same command with --use-segmentation in place of --use-embedded-segment, "
                    "adding --dataset /data/shop --limit 100 --model /models/clip --precision fp32 (the old store is "
                    "replaced)."), said
    said = reuse_or_rebuild(["backend"], made, source, False, None)
    assert said.startswith("To reuse it, ask for what made it: --backend torch --model /models/clip; or "), said


@pytest.mark.subprocess
def test_an_unreachable_hub_is_found_once_and_the_run_ends_fast(tiny_onnx, tmp_path):
    """No HF_HUB_OFFLINE, and nothing listens at the hub's address: one probe, one warning, then the
    dataset's own error, with none of huggingface_hub's retries."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{free_port()}", HF_HOME=str(tmp_path / "hf"), PYTHONPATH=str(ROOT))
    args = ["--dataset", "owner/catalogue", "--onnx", str(tiny_onnx), "--output-dir", str(tmp_path / "o"), "-q"]
    done = subprocess.run(
        [sys.executable, str(ROOT / "main.py"), *args], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 1
    assert done.stderr.count("cannot be reached") == 1 and "Retrying" not in done.stderr
    said = "works offline, as HF_HUB_OFFLINE=1 would: --dataset owner/catalogue must be in this machine's hub cache"
    assert said in done.stderr
    assert "--dataset DIR" in done.stderr
    assert "--model patrickjohncyh" not in done.stderr  # the ONNX file needs no model


@pytest.mark.parametrize("flags, asked", [
    ([], ["--dataset lirus18/deepfashion"]),
    (["--use-embeddings"], []),
    (["--query-text", "red"], []),
    (["--serve"], []),
    (["--export", "parquet:x"], []),
    (["--evaluate"], ["--dataset lirus18/deepfashion"]),
    (["--export-onnx"], ["--dataset lirus18/deepfashion", "--model patrickjohncyh/fashion-clip"]),
    (["--query-text", "red", "--backend", "torch"], ["--model patrickjohncyh/fashion-clip"]),
])
def test_the_hub_is_asked_about_what_the_run_reads_from_it(flags, asked, tmp_path, monkeypatch):
    """Search modes read a store, never the dataset: no probe, no warning about a dataset they do not read."""
    import main as cli
    from pipeline.hub import hub_names

    monkeypatch.chdir(tmp_path)  # no ./onnx: the ONNX backend is what the flags say
    parser = cli.build_parser()
    args = parser.parse_args([*flags, "--onnx", "x.onnx"] if "--backend" not in flags and "--export-onnx" not in flags
                             else flags)
    explicit = frozenset(a.lstrip("-").replace("-", "_") for a in flags if a.startswith("--")) | {"onnx"}
    assert hub_names(config_from_flags(vars(args), explicit=explicit)) == asked


def test_a_folder_that_is_not_a_model_is_said_to_be_one_not_told_to_go_offline(tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(b"x")
    data = assets.write_parquet_dataset(tmp_path / "ds", [assets.jpeg_bytes(40, 40)])
    assert run("--model", folder, "--backend", "torch", "--dataset", data, "--output-dir", tmp_path / "o") == 1
    err = capsys.readouterr().err
    assert f"{folder} is a folder but not a model's: a transformers model folder has config.json" in err
    assert "this one has a.jpg." in err and "Without network access" not in err


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_a_model_path_that_does_not_exist_is_said_to_be_neither_a_folder_nor_a_hub_id(backend, tmp_path, capsys):
    """Not huggingface_hub's "Repo id must be in the form 'repo_name' or 'namespace/repo_name'",
    nor the advice to go offline: the path is wrong."""
    missing = tmp_path / "no-such-model"
    data = assets.write_parquet_dataset(tmp_path / "ds", [assets.jpeg_bytes(40, 40)])
    assert run("--model", missing, "--backend", backend, "--dataset", data, "--output-dir", tmp_path / "o") == 2
    err = capsys.readouterr().err  # a bad flag, said before the model loads (10 s) or the dataset opens
    assert f"--model {missing}: no such folder (a local model is the folder its save_pretrained wrote" in err
    assert "Without network access" not in err


def test_a_store_of_another_dataset_configuration_is_reused_with_its_config_flag():
    from pipeline.remedy import _flags_for

    assert _flags_for("config", {"config": "small"}, None) == ["--config small"]
    assert _flags_for("config", {"config": None}, None) == ["(without --config)"]


@pytest.mark.parametrize("made, asked", [
    ({"backend": "onnx", "onnx_sha256": "a" * 64, "model": "org/exported-from"}, []),  # the file: no hub model
    ({"backend": "torch", "model": "org/model"}, ["--model org/model"]),  # the store's model, not the default
    ({"backend": "torch", "model": "/models/local"}, []),
    ({"backend": "torch", "model": "hf-hub:Marqo/marqo-fashionSigLIP"}, ["--model hf-hub:Marqo/marqo-fashionSigLIP"]),
])
def test_a_search_from_anywhere_asks_the_hub_about_the_store_s_model_not_the_default(made, asked, tmp_path,
                                                                                       monkeypatch):
    """No model flags, no default file here: the search embeds with the store's own embedder, so the
    offline check names that one (it named the default model, which the search never loads)."""

    from pipeline import galleries
    from pipeline.hub import hub_names
    from pipeline.identity import VectorIdentity

    store = tmp_path / "out" / "embeddings"
    store.mkdir(parents=True)
    (store / "embeddings.json").write_text("{}")  # there; what it records is read by the stand-in below

    class Made:  # the sidecar's reading, as store.Sidecar.read gives it
        identity = VectorIdentity(**made, family="clip")

    monkeypatch.setattr(galleries.Sidecar, "read", staticmethod(lambda path: Made()))
    monkeypatch.chdir(tmp_path)
    args = cli.build_parser().parse_args(["--query-text", "red", "--output-dir", str(tmp_path / "out")])
    assert hub_names(config_from_flags(vars(args), explicit=frozenset({"query_text", "output_dir"}))) == asked


def test_an_export_of_a_local_model_to_the_default_file_asks_the_hub_nothing(tmp_path, monkeypatch):
    """default_file_note compared the default model by its reference, which read its family from the
    hub: 23 s of retries offline after a fully local export."""
    from pipeline import embedders
    from pipeline.runner import default_file_note

    def no_hub(model: str):
        raise AssertionError(f"asked the hub about {model}")

    monkeypatch.setattr(embedders, "known_family", no_hub)
    folder = tmp_path / "m"
    folder.mkdir()
    cfg = config_from_flags(vars(cli.build_parser().parse_args(["--export-onnx", "--model", str(folder)])),
                            explicit=frozenset({"export_onnx", "model"}))
    assert "is the default --onnx: gallery builds without --onnx or --model now embed with" in default_file_note(cfg)
    default = config_from_flags(vars(cli.build_parser().parse_args(["--export-onnx"])), explicit=frozenset())
    assert default_file_note(default) is None


def test_the_gallery_flags_a_search_was_typed_with_are_words_a_shell_reads_back():
    """Only what makes a gallery (not the query, not --output-dir), in the order of --help, quoted."""
    import shlex

    import main

    parser = main.build_parser()
    argv = ["--query-text", "red dress", "--limit", "5", "--dataset", "my photos/", "--use-segmentation",
            "--keep-unsegmented", "--output-dir", "o", "--model", "m"]
    args = parser.parse_args(argv)
    words = main.gallery_flags(parser, args, main.explicit_options(parser, argv))
    assert words == ("--dataset", "'my photos/'", "--limit", "5", "--model", "m", "--keep-unsegmented")
    assert shlex.split(" ".join(words))[1] == "my photos/"


def test_a_rebuild_command_carries_everything_that_made_the_store_but_what_was_typed():
    """The rebuild left out --limit 0 (every row: recorded as none) and every segmentation setting:
    pasted, it replaced the store with 10,000 rows cut by the default segmenter."""
    from pipeline.identity import GallerySource, VectorIdentity
    from pipeline.remedy import reuse_or_rebuild

    source = GallerySource(kind="segment", dataset="/data/shop", limit=None, seg_model="/w/custom-seg.pt",
                           seg_conf=0.6, seg_imgsz=960, keep_unsegmented=True, max_persons=2)
    made = VectorIdentity(backend="torch", family="clip", model="/models/clip", model_sha256="a" * 64,
                          precision="fp16")
    said = reuse_or_rebuild(["model"], made, source, True, None, search_from="out", typed=("--model", "/m/other"))
    assert said.endswith("rebuild it with a gallery run: python main.py --use-segmentation --dataset /data/shop "
                         "--limit 0 --seg-model /w/custom-seg.pt --seg-conf 0.6 --seg-imgsz 960 --max-persons 2 "
                         "--keep-unsegmented --model /m/other --output-dir out (the old store is replaced; change "
                         "what you want made otherwise)."), said
    said = reuse_or_rebuild(["model"], made, source, True, None, search_from="out", typed=("--seg-conf", "0.3"))
    assert "--seg-conf 0.6" not in said and "--seg-conf 0.3 --output-dir" in said
    assert "--model /models/clip --precision fp16" in said.split("; or ")[1]  # the store's own model, as run


def test_a_model_folder_moved_or_copied_since_the_export_is_the_files_model(tiny_clip, tiny_onnx, tmp_path):
    """--eval-backends refused a moved folder with the same weights ("exported from .../repo, not from
    --model .../moved"), and a typed --model beside such a file was said unused: the weights decide."""
    import shutil

    import onnx
    from pipeline.config import onnx_of_another_model
    from pipeline.embedders import META_SOURCE_MODEL, META_SOURCE_WEIGHTS, EmbedderSpec, model_weights_sha256

    copied = tmp_path / "copied"
    shutil.copytree(tiny_clip, copied)
    assert onnx_of_another_model(EmbedderSpec(model=str(copied), onnx=str(tiny_onnx))) is None  # its folder is there
    moved = tmp_path / "moved_int8.onnx"  # exported from a folder since moved: the weights the file records
    model = onnx.load(str(tiny_onnx))
    for prop in model.metadata_props:
        if prop.key == META_SOURCE_MODEL:
            prop.value = str(tmp_path / "gone")
    model.metadata_props.add(key=META_SOURCE_WEIGHTS, value=model_weights_sha256(str(tiny_clip)))
    onnx.save(model, str(moved))
    assert onnx_of_another_model(EmbedderSpec(model=str(copied), onnx=str(moved))) is None
    other = assets.save_tiny_clip(tmp_path / "other", seed=7)  # other weights: another model, said
    assert onnx_of_another_model(EmbedderSpec(model=str(other), onnx=str(moved))) == str(tmp_path / "gone")
    assert onnx_of_another_model(EmbedderSpec(model=str(other), onnx=str(tiny_onnx))) == str(tiny_clip)


def test_backend_onnx_alone_against_a_store_the_torch_backend_made_is_said_as_such(tiny_clip, tmp_path,
                                                                                  monkeypatch, capsys):
    """The default file not there: "make it with --export-onnx --model patrickjohncyh/fashion-clip"
    exported a model the store (an open_clip model's, say) was never made by."""
    data = assets.write_parquet_dataset(tmp_path / "ds", [assets.jpeg_bytes(40, 40, seed=i) for i in range(3)])
    out = tmp_path / "g"
    assert run("--dataset", data, "--model", tiny_clip, "--backend", "torch", "--output-dir", out,
               "--max-result-images", "0") == 0
    monkeypatch.chdir(tmp_path)  # no onnx/ here
    capsys.readouterr()
    assert run("--query-text", "red", "--backend", "onnx", "--output-dir", out) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert (f"{out / 'embeddings'} was made by {tiny_clip} (torch, fp32): --backend onnx would embed its queries "
            "with an ONNX file") in err and "Drop --backend onnx" in err and "fashion-clip" not in err
