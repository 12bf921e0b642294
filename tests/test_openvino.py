"""--onnx-runtime openvino: the exported file on OpenVINO (pipeline/ovruntime.py). Its vectors are
within rounding of onnxruntime's, do not depend on their batch, and a store records which runtime
made it, so that one runtime's vectors never join the other's."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.catalog import Catalog
from pipeline.embedders import EmbedderSpec, OnnxEmbedder, make_embedder
from pipeline.errors import PipelineError
from tests.helpers import run, stop_after_shards
from tests.test_update import args, assert_same_as_fresh, comparable, write_catalogue

pytest.importorskip("openvino")

OPENVINO = ("--onnx-runtime", "openvino")


def sidecar_identity(out: Path) -> dict:
    return json.loads((out / "embeddings" / "embeddings.json").read_text())["identity"]


def test_openvino_runs_the_file_within_rounding_of_onnxruntime_each_picture_apart_from_its_batch(tiny_onnx):
    ov = make_embedder(EmbedderSpec(onnx=str(tiny_onnx), backend="onnx", runtime="openvino", threads=2))
    ort = OnnxEmbedder(tiny_onnx)
    assert type(ov).__name__ == "OpenVinoEmbedder" and ov.lanes == 2
    assert ov.self_check.startswith("self-check passed")  # the file's probes, run on OpenVINO
    assert ov.identity.runtime == "openvino" and ort.identity.runtime == "onnxruntime"
    assert ov.identity.asks(runtime="onnxruntime") == ort.identity  # nothing else differs
    assert "openvino" in ov.identity.label() and "onnxruntime" not in ort.identity.label()
    cfg = ov.preprocess_cfg
    x = np.random.default_rng(3).uniform(-2, 2, (9, 3, cfg.crop_height, cfg.crop_width)).astype(np.float32)
    got, want = ov.embed(x), ort.embed(x)
    assert got.shape == want.shape == (9, ov.dim) and got.dtype == np.float32
    assert np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)
    cosines = (got * want).sum(1)
    assert cosines.min() > 0.999 and not np.array_equal(got, want)  # its own arithmetic, the same model
    for i in range(len(x)):  # one alone is the same picture in the batch of 9, split over two streams
        assert np.array_equal(ov.embed(x[i:i + 1])[0], got[i])
    assert np.array_equal(ov.embed_serial(x), got)  # one stream, one slice: the same vectors
    texts = ["a red dress", "white sneakers"]
    assert np.array_equal(ov.embed_text(texts), ort.embed_text(texts))  # the text tower runs on onnxruntime
    with pytest.raises(PipelineError, match=r"the image file takes \(batch, 3, 224, 224\), got \(9, 3, 100, 224\)"):
        ov.embed(x[:, :, :100])


def test_openvino_held_to_avx2_kernels_passes_the_file_s_probes(tiny_onnx, tmp_path):
    """OpenVINO's int8 kernels of an AVX2-only CPU (oneDNN's ISA cap; the 7-bit weights keep their
    16-bit pair sums from saturating): the probes pass and the vectors stay within rounding of
    onnxruntime's. (On this machine's own kernels the other tests run. That the cap reaches
    OpenVINO's kernels shows in their speed on the real architecture, 26.8 against 175 img/s on an
    AMD EPYC, README; no test times anything.)"""
    import os
    import subprocess

    out = tmp_path / "avx2.npy"
    code = (f"import numpy as np; from pipeline.embedders import EmbedderSpec, make_embedder; "
            f"e = make_embedder(EmbedderSpec(onnx={str(tiny_onnx)!r}, backend='onnx', runtime='openvino')); "
            f"x = np.random.default_rng(5).uniform(-2, 2, (6, 3, 224, 224)).astype(np.float32); "
            f"np.save({str(out)!r}, e.embed(x)); print(e.self_check)")
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
    assert "self-check passed" in done.stdout
    x = np.random.default_rng(5).uniform(-2, 2, (6, 3, 224, 224)).astype(np.float32)
    assert (np.load(out) * OnnxEmbedder(tiny_onnx).embed(x)).sum(1).min() > 0.999


def test_without_openvino_or_on_cuda_it_says_what_to_do(tiny_onnx, monkeypatch):
    spec = EmbedderSpec(onnx=str(tiny_onnx), backend="onnx", runtime="openvino")
    with pytest.raises(PipelineError, match="runs the file on the CPU: drop --device cuda"):
        make_embedder(EmbedderSpec(onnx=str(tiny_onnx), backend="onnx", runtime="openvino", device="cuda"))
    monkeypatch.setitem(sys.modules, "openvino", None)  # as if it were not installed
    with pytest.raises(PipelineError, match="needs OpenVINO: pip install openvino"):
        make_embedder(spec)


def test_a_file_openvino_cannot_read_is_refused_with_the_export_it_can(tiny_clip, tmp_path):
    """The AMX profile's file (the export's `auto` on an Intel CPU) has onnxruntime's QGemm,
    QLinearSigmoid and QLinearMul, which OpenVINO does not convert: refused before loading, with the
    export OpenVINO reads; any other file it cannot convert names what it could not."""
    from pipeline.export import export_onnx

    amx = tmp_path / "amx_int8.onnx"
    export_onnx(str(tiny_clip), amx, profile="amx")
    with pytest.raises(PipelineError, match=r"an int8 file of the AMX profile .*--int8-profile vnni .*"
                                            r"--quantization static-qdq"):
        make_embedder(EmbedderSpec(onnx=str(amx), backend="onnx", runtime="openvino"))
    assert OnnxEmbedder(amx).identity.runtime == "onnxruntime"  # onnxruntime runs it
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    with pytest.raises(PipelineError, match=r"cannot read ONNX file .*broken\.onnx: DecodeError.*--export-onnx"):
        make_embedder(EmbedderSpec(onnx=str(broken), backend="onnx", runtime="openvino"))
    # a file whose fixed picture size is not what its preprocessing makes (CLIP's 224, no metadata here)
    from onnx import TensorProto, helper

    node = helper.make_node("ReduceMean", ["x"], ["y"], axes=[2, 3], keepdims=0)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 64, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])])
    small = tmp_path / "small.onnx"
    onnx_save = __import__("onnx").save
    onnx_save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), small)
    with pytest.raises(PipelineError, match=r"small\.onnx: input height is 64 but preprocessing makes 224"):
        make_embedder(EmbedderSpec(onnx=str(small), backend="onnx", runtime="openvino"))
    # a model OpenVINO does not convert: named by its operations
    import onnx
    from onnx import TensorProto, helper

    node = helper.make_node("NoSuchOp", ["x"], ["y"], domain="com.example")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    odd = tmp_path / "odd.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                      helper.make_opsetid("com.example", 1)]), odd)
    with pytest.raises(PipelineError, match=r"OpenVINO cannot load the ONNX file .*odd\.onnx \(it does not convert "
                                            r"com\.example\.NoSuchOp\): export a file for it"):
        make_embedder(EmbedderSpec(onnx=str(odd), backend="onnx", runtime="openvino"))


def test_a_file_that_fails_its_probes_on_openvino_is_refused_naming_onnxruntime(tiny_onnx, monkeypatch):
    """Where OpenVINO's vectors fall under the file's bar (Marqo-FashionSigLIP's architecture with random
    weights did on an AMD EPYC: 0.966 against onnxruntime's 0.996; simulated here by turning its
    outputs), the file is refused on it, saying to run it on onnxruntime, which runs it."""
    from pipeline.ovruntime import OpenVinoEmbedder

    run = OpenVinoEmbedder._run
    monkeypatch.setattr(OpenVinoEmbedder, "_run", lambda self, x: np.roll(run(self, x), 1, axis=1))
    refused = (r"failed its self-check on this CPU: .* \(needs >= 0\.9\d*; .*On OpenVINO: its int8 kernels round "
               r"otherwise than onnxruntime's.*run it on onnxruntime, the default "
               r"\(without --onnx-runtime openvino; a store made on OpenVINO is then rebuilt without "
               r"--onnx-runtime\)\.$")
    with pytest.raises(PipelineError, match=refused):
        make_embedder(EmbedderSpec(onnx=str(tiny_onnx), backend="onnx", runtime="openvino"))
    assert OnnxEmbedder(tiny_onnx).self_check.startswith("self-check passed")


def test_a_store_records_its_runtime_and_an_update_never_mixes_the_two(tiny_onnx, tmp_path, capsys):
    data = write_catalogue(tmp_path / "catalogue", list(range(8)))
    ov_store, ort_store, ov_fresh = tmp_path / "ov", tmp_path / "ort", tmp_path / "ov_fresh"
    assert run(*args(data, tiny_onnx, ov_store, *OPENVINO)) == 0
    assert run(*args(data, tiny_onnx, ort_store)) == 0
    assert sidecar_identity(ov_store)["runtime"] == "openvino"
    assert "runtime" not in sidecar_identity(ort_store)  # written as before OpenVINO: older stores are alike
    ov_lines, ov_vectors, ov_files = comparable(ov_store)
    ort_lines, ort_vectors, ort_files = comparable(ort_store)
    assert ov_lines == ort_lines and ov_files == ort_files  # the same photos, files and thumbnails
    assert not np.array_equal(ov_vectors, ort_vectors)
    emb = [np.load(s / "embeddings" / "embeddings.npy") for s in (ov_store, ort_store)]
    assert (emb[0] * emb[1]).sum(1).min() > 0.999

    write_catalogue(data, list(range(13)))
    capsys.readouterr()
    assert run(*args(data, tiny_onnx, ov_store, "--update", "--onnx-runtime", "onnxruntime")) == 1
    err = capsys.readouterr().err
    assert "runtime: cache has 'openvino', asked for 'onnxruntime'" in err
    assert "Its vectors were made on openvino: add --onnx-runtime openvino to update it with them." in err
    assert run(*args(data, tiny_onnx, ort_store, "--update", *OPENVINO)) == 1
    err = capsys.readouterr().err
    assert "runtime: cache has 'onnxruntime', asked for 'openvino'" in err  # a store of before: onnxruntime's
    assert "add --onnx-runtime onnxruntime" in err
    assert run(*args(data, tiny_onnx, ov_store, "--update")) == 0  # no runtime named: the store's own
    assert sidecar_identity(ov_store)["runtime"] == "openvino"
    assert run(*args(data, tiny_onnx, ov_store, "--update", *OPENVINO)) == 0
    assert run(*args(data, tiny_onnx, ov_fresh, *OPENVINO)) == 0
    assert_same_as_fresh(ov_store, ov_fresh)  # its vectors do not depend on the batches they were made in


def test_queries_and_resumed_runs_ask_for_the_runtime_that_made_the_store(tiny_onnx, tmp_path, capsys,
                                                                          monkeypatch):
    data = write_catalogue(tmp_path / "catalogue", list(range(8)))
    store = tmp_path / "ov"
    assert run(*args(data, tiny_onnx, store, *OPENVINO)) == 0
    picture = next((store / "images").iterdir())
    capsys.readouterr()
    # the file named, the runtime not: the store's, as the Python API takes it; the other one named: refused
    from pipeline.ovruntime import OpenVinoEmbedder

    built = []
    monkeypatch.setattr(OpenVinoEmbedder, "from_spec", lambda spec, _real=OpenVinoEmbedder.from_spec: (
        built.append(spec.runtime), _real(spec))[1])
    assert run("--query-image", picture, "--onnx", tiny_onnx, "--output-dir", store) == 0
    assert built == ["openvino"]
    assert run("--query-image", picture, "--onnx", tiny_onnx, "--output-dir", store, "--onnx-runtime",
               "onnxruntime") == 1
    err = capsys.readouterr().err
    assert "runtime: cache has 'openvino', asked for 'onnxruntime'" in err
    assert "To reuse it, ask for what made it: --onnx-runtime openvino" in err
    assert run("--query-image", picture, "--onnx", tiny_onnx, "--output-dir", store, *OPENVINO) == 0
    monkeypatch.undo()
    catalog = Catalog.open(store, onnx=str(tiny_onnx))
    assert catalog.embedder.identity.runtime == "openvino"
    hit = catalog.search_image(picture, k=1)[0].hits[0]
    assert hit.file == picture.name and hit.distance < 1e-3  # a stored photo finds itself

    resumed = tmp_path / "resumed"
    stop_after_shards(monkeypatch, 1)
    assert run(*args(data, tiny_onnx, resumed, *OPENVINO)) == 130
    monkeypatch.undo()
    capsys.readouterr()
    assert run(*args(data, tiny_onnx, resumed)) == 1
    err = capsys.readouterr().err
    assert "identity.runtime: cache has 'openvino', asked for 'onnxruntime'" in err
    assert run(*args(data, tiny_onnx, resumed, *OPENVINO)) == 0
    assert_same_as_fresh(resumed, store)
    # the other way round: a run begun on onnxruntime is not resumed on OpenVINO
    other = tmp_path / "other"
    stop_after_shards(monkeypatch, 1)
    assert run(*args(data, tiny_onnx, other)) == 130
    monkeypatch.undo()
    capsys.readouterr()
    assert run(*args(data, tiny_onnx, other, *OPENVINO)) == 1
    err = capsys.readouterr().err
    assert "identity.runtime: cache has 'onnxruntime', asked for 'openvino'" in err
    assert "resume it (it ran on onnxruntime: --onnx-runtime onnxruntime), or add --fresh" in err


def test_with_no_model_flags_a_search_runs_on_the_store_s_own_runtime(tiny_onnx, tmp_path, capsys, monkeypatch):
    """No --onnx given: the search finds the store's file by its sha256 in ./onnx and runs it on the
    runtime the store records; naming the other runtime is refused with the flag to give."""
    import shutil

    data = write_catalogue(tmp_path / "catalogue", list(range(8)))
    store, built = tmp_path / "ov", tmp_path / "built" / "m_int8.onnx"
    built.parent.mkdir()
    shutil.copy(tiny_onnx, built)
    assert run(*args(data, built, store, *OPENVINO)) == 0
    built.unlink()  # not where the store recorded it any more: found by its sha256
    (tmp_path / "here" / "onnx").mkdir(parents=True)
    shutil.copy(tiny_onnx, tmp_path / "here" / "onnx" / "kept.onnx")
    monkeypatch.chdir(tmp_path / "here")
    picture = next((store / "images").iterdir())
    from pipeline.ovruntime import OpenVinoEmbedder

    opened: list[Path] = []
    init = OpenVinoEmbedder.__init__
    monkeypatch.setattr(OpenVinoEmbedder, "__init__", lambda self, path, *a, **k: (opened.append(Path(path)),
                                                                                    init(self, path, *a, **k))[1])
    capsys.readouterr()
    assert run("--query-image", picture, "--output-dir", store, "--top-k", "1") == 0
    assert [p.name for p in opened] == ["kept.onnx"]  # the store's own file, on OpenVINO
    assert run("--query-image", picture, "--output-dir", store, "--onnx-runtime", "onnxruntime") == 1
    assert "runtime: cache has 'openvino', asked for 'onnxruntime'" in capsys.readouterr().err


@pytest.mark.parametrize("more, said", [
    (("--backend", "torch"), "--onnx-runtime openvino runs an ONNX file, and this run embeds with the torch backend"),
    (("--device", "cuda"), "--onnx-runtime openvino runs the file on the CPU: drop --device cuda"),
    (("--export-onnx",), "--export-onnx writes the file, which every runtime reads"),
])
def test_flags_it_does_not_go_with_are_refused(tmp_path, capsys, more, said):
    assert run("--onnx", tmp_path / "f.onnx", *OPENVINO, *more) == 2
    assert said in capsys.readouterr().err


def test_an_evaluation_on_openvino_names_the_runtime_in_its_table(tiny_onnx, tmp_path):
    """--evaluate --onnx-runtime openvino scores the file on OpenVINO and says so: "onnx-int8 (openvino)"
    in evaluation.json (and its table), where onnxruntime's is "onnx-int8"."""
    from tests import assets
    from tests.test_search import _garment, _noisy

    garments = [_garment(i) for i in range(8)]
    ds = assets.write_parquet_dataset(
        tmp_path / "pairs", [assets.encode(_noisy(g, seed=i), "JPEG", quality=80) for i, g in enumerate(garments)],
        extra={"cloth": [assets.encode(g, "JPEG", quality=95) for g in garments]})
    scores = {}
    for runtime in ("onnxruntime", "openvino"):
        out = tmp_path / runtime
        assert run("--evaluate", "--dataset", ds, "--onnx", tiny_onnx, "--output-dir", out, "-q",
                   "--onnx-runtime", runtime) == 0
        scores[runtime] = json.loads((out / "outputs" / "evaluation.json").read_text())["results"]["person->garment"]
    assert list(scores["onnxruntime"]) == ["onnx-int8"] and list(scores["openvino"]) == ["onnx-int8 (openvino)"]
    on_ov, on_ort = scores["openvino"]["onnx-int8 (openvino)"], scores["onnxruntime"]["onnx-int8"]
    assert on_ov["queries"] == 8
    assert on_ov["recall@10"] == 1.0
    # its own scores, within rounding of onnxruntime's (8 garments: every rank known)
    assert on_ov["recall@1"] >= 0.75 and abs(on_ov["recall@1"] - on_ort["recall@1"]) <= 1 / 8  # one query at most
    assert on_ov["mrr"] == pytest.approx(on_ort["mrr"], abs=0.07)


def test_the_search_page_says_its_store_runs_on_openvino(mixed_dataset, tiny_onnx, tmp_path, browser):
    """--serve of a store made on OpenVINO: its queries run there, and the page's line says so
    ("onnx on openvino"); /api/info names the runtime."""
    import httpx

    import main as cli
    from pipeline.config import config_from_flags
    from pipeline.serve import SearchService
    from tests.test_serve import search_text, serving

    out = tmp_path / "served"
    flags = ["--onnx", str(tiny_onnx), "--output-dir", str(out), *OPENVINO]
    assert cli.main(["--dataset", str(mixed_dataset), *flags, "-q"]) == 3
    service = SearchService.load(config_from_flags(vars(cli.build_parser().parse_args([*flags, "--serve"]))))
    assert service.current().embedder.identity.runtime == "openvino"
    with serving(service) as url:
        info = httpx.get(url + "/api/info").json()
        assert info["backend"] == "onnx" and info["runtime"] == "openvino"
        search_text(browser, url, "red dress")
        line = browser.find_element("id", "info").text
        assert " items · onnx on openvino · search: " in line, line
