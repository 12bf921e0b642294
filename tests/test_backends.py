"""The backend and model-family registry: one table the CLI, the checks and make_embedder read."""

from __future__ import annotations

import json

import pytest

import main as cli
from pipeline import backends
from pipeline.backends import BACKENDS, EVAL_BACKENDS, Backend, family_of
from pipeline.embedders import EmbedderSpec, make_embedder
from pipeline.errors import PipelineError


def test_the_cli_choices_come_from_the_registry():
    actions = {a.dest: a for a in cli.build_parser()._actions}
    assert tuple(actions["backend"].choices) == ("auto", *sorted(BACKENDS))
    assert set(actions["precision"].choices) == {p for b in BACKENDS.values() for p in b.precisions}
    assert all(e.backend in BACKENDS for e in EVAL_BACKENDS.values())


def test_a_backend_added_to_the_table_is_built_by_make_embedder(monkeypatch):
    class Fake:
        @classmethod
        def from_spec(cls, spec):
            made = cls()
            made.spec = spec
            return made

    monkeypatch.setattr("tests.test_backends.Fake", Fake, raising=False)
    monkeypatch.setitem(BACKENDS, "fake", Backend("fake", "tests.test_backends:Fake", ("auto",), ("auto",)))
    built = make_embedder(EmbedderSpec(backend="fake", model="m"))
    assert isinstance(built, Fake) and built.spec.model == "m"
    with pytest.raises(PipelineError, match="unknown backend 'nope'; choose from torch, onnx, fake"):
        make_embedder(EmbedderSpec(backend="nope"))


def test_model_families_are_recognised_by_their_config(tmp_path, tiny_clip, capsys):
    assert family_of(str(tiny_clip)).name == "clip"
    assert family_of("patrickjohncyh/fashion-clip", read_config=lambda m: None).name == "clip"  # hub id, offline
    siglip = tmp_path / "siglip"
    siglip.mkdir()
    (siglip / "config.json").write_text(json.dumps({"model_type": "siglip"}))
    assert family_of(str(siglip)).name == "siglip" and not family_of(str(siglip)).text_mask
    (siglip / "config.json").write_text(json.dumps({"model_type": "siglip2"}))
    with pytest.raises(PipelineError, match="model type 'siglip2': SigLIP 2 takes pictures as variable-resolution"):
        family_of(str(siglip))
    (siglip / "config.json").write_text(json.dumps({"model_type": "blip"}))
    with pytest.raises(PipelineError, match="model type 'blip' is not supported .*embeds with: clip, siglip"):
        family_of(str(siglip))
    # the CLI says so before any work, instead of a size-mismatch error from transformers
    assert cli.main(["--query-text", "red", "--model", str(siglip), "--backend", "torch", "--output-dir",
                     str(tmp_path / "o"), "-q"]) == 1
    assert "model type 'blip' is not supported" in capsys.readouterr().err


def test_a_family_added_to_the_table_is_loaded_with_its_class(monkeypatch, tmp_path):
    loaded = []

    class Model:
        @staticmethod
        def from_pretrained(model, **kw):
            loaded.append((model, kw))
            return "model"

    monkeypatch.setattr("tests.test_backends.Model", Model, raising=False)
    monkeypatch.setitem(backends.FAMILIES, "toy", backends.ModelFamily("toy", ("toy",), "tests.test_backends:Model"))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "toy"}))
    assert family_of(str(tmp_path)).load(str(tmp_path), dtype="x") == "model"
    assert loaded == [(str(tmp_path), {"dtype": "x"})]
