"""The mode registry: each mode declared once, the CLI's checks and the runner's dispatch built from it."""

from __future__ import annotations

from dataclasses import replace

import pytest

from pipeline.config import EvalSpec, ExportSpec, QuerySpec, RunConfig, ServeSpec, VideoSpec
from pipeline.embedders import EmbedderSpec
from pipeline.modes import MODES, check_config, selected_mode


def _spell(dests: set[str]) -> str:
    return ", ".join("--" + d.replace("_", "-") for d in sorted(dests))


@pytest.mark.parametrize(
    "cfg, mode",
    [
        (RunConfig(), "gallery"),
        (RunConfig(use_embeddings=True), "gallery"),
        (RunConfig(export=ExportSpec(enabled=True)), "export-onnx"),
        (RunConfig(serve=ServeSpec(enabled=True)), "serve"),
        (RunConfig(video=VideoSpec(clip="clip_1")), "video"),
        (RunConfig(query=QuerySpec(texts=("red dress",))), "query"),
        (RunConfig(evaluate=EvalSpec(enabled=True)), "evaluate"),
    ],
)
def test_each_configuration_selects_one_mode_whose_run_function_exists(cfg, mode):
    assert selected_mode(cfg).name == mode
    assert check_config(cfg, _spell) is None
    assert callable(selected_mode(cfg).load())


def test_modes_are_declared_once_and_the_gallery_comes_last():
    names = [m.name for m in MODES]
    assert len(set(names)) == len(names) and names[-1] == "gallery"
    owned = [d for m in MODES for d in m.options]
    assert len(owned) == len(set(owned))  # an option belongs to one mode


@pytest.mark.parametrize(
    "cfg, message",
    [
        (RunConfig(explicit=frozenset({"port"})), "--port needs --serve"),
        (RunConfig(explicit=frozenset({"frame_stride", "det_conf"})),
         "--det-conf, --frame-stride need --video_clip NAME"),
        (RunConfig(evaluate=EvalSpec(enabled=True), serve=ServeSpec(enabled=True)),
         "--evaluate and --serve are separate modes"),
        (RunConfig(evaluate=EvalSpec(enabled=True, backends=("tpu",))), "--eval-backends: unknown ['tpu']"),
        (RunConfig(evaluate=EvalSpec(enabled=True), use_embeddings=True), "does not read a cache"),
        (RunConfig(query=QuerySpec(texts=("x",)), engine="ray"), "--engine ray builds galleries"),
        (RunConfig(evaluate=EvalSpec(enabled=True), engine="ray"), "other modes run locally: drop --engine ray"),
        (RunConfig(video=VideoSpec(clip="clip_1"), engine="ray"),
         "other modes run locally: build its gallery with --engine ray first, then run the same command without it "
         "and with --use-embeddings"),
        (RunConfig(engine="ray", use_embeddings=True), "a cache flag reuses one and builds nothing: drop --engine ray"),
        (RunConfig(engine="ray", use_embedded_segment=True), "builds nothing: drop --engine ray"),
        (RunConfig(engine="ray", embedder=EmbedderSpec(decode="device")),
         "--decode device decodes on the model's GPU; Ray's workers decode on the CPU"),
        (RunConfig(export=ExportSpec(enabled=True), use_segmentation=True), "makes the ONNX file and stops"),
        (RunConfig(explicit=frozenset({"seg_conf"})), "--seg-conf needs --use-segmentation"),
        (RunConfig(explicit=frozenset({"max_persons"})), "--max-persons needs --use-segmentation"),
        (RunConfig(use_embeddings=True, fresh=True), "--fresh rebuilds the gallery"),
        (RunConfig(exports=("lancedb:shop.lance",), filter="price < 50"),
         "--filter only changes searches (queries, neighbours, --evaluate, --serve, --video_clip, the Python API); "
         "--export does not search the catalogue, so it would ignore it: drop it"),
        (RunConfig(exports=("parquet:out.parquet",), group_by="item_id", filter="price < 5"),
         "--filter and --group-by only change searches"),
        (RunConfig(exports=("parquet:out.parquet",), group_by="item_id", filter="price < 5"),
         "so it would ignore them: drop them"),
        (RunConfig(export=ExportSpec(enabled=True), group_by="item_id"), "--export-onnx does not search"),
        (RunConfig(export=ExportSpec(enabled=True), dedup=True),
         "--dedup only changes searches (queries, neighbours, --serve, --video_clip, the Python API)"),
        (RunConfig(evaluate=EvalSpec(enabled=True), dedup=True), "--evaluate already counts byte-identical pictures"),
        (RunConfig(evaluate=EvalSpec(enabled=True, models=("a/clip", "b", "a/clip"))),
         "--eval-models names a/clip more than once"),
        (RunConfig(evaluate=EvalSpec(enabled=True, models=("a", "b")), explicit=frozenset({"onnx"})),
         "--eval-models names every model compared"),
        (RunConfig(evaluate=EvalSpec(enabled=True, id_column="item_ID"), explicit=frozenset({"eval_cloth_column"})),
         "--eval-id-column scores same-product retrieval, --eval-cloth-column person -> garment: choose one"),
        (RunConfig(explicit=frozenset({"int8_profile"})), "--int8-profile needs --export-onnx"),
        (RunConfig(export=ExportSpec(enabled=True, quantization="dynamic", int8_profile="amx"),
                   explicit=frozenset({"int8_profile"})),
         "--int8-profile chooses the graph of --quantization static (the default); dynamic files have one graph"),
        (RunConfig(query=QuerySpec(texts=("red",), fusion="rrf"), explicit=frozenset({"fusion"})),
         "--fusion and --text-weight say how a picture and texts make one query"),
        (RunConfig(query=QuerySpec(images=("a.jpg",)), explicit=frozenset({"text_weight"})),
         "give them with --query-image and --query-text"),
        (RunConfig(query=QuerySpec(texts=("red",), negative=("buttons",)), explicit=frozenset({"negative_text"})),
         "--negative-text is taken away from a picture's query: give it with --query-image"),
        (RunConfig(query=QuerySpec(images=("a.jpg",), texts=("red",), fusion="rrf", text_weight=3.0),
                   explicit=frozenset({"fusion", "text_weight"})), "--fusion rrf fuses the picture's and each text's"),
        (RunConfig(query=QuerySpec(images=("a.jpg",), texts=("red",), negative=("x",), fusion="rrf"),
                   explicit=frozenset({"fusion", "negative_text"})), "cannot subtract a --negative-text"),
    ],
)
def test_refusals_come_from_the_registry(cfg, message):
    problem = check_config(cfg, _spell)
    assert problem is not None and message in problem


def test_picture_and_text_flags_are_taken_where_a_picture_meets_a_text():
    both = QuerySpec(images=("a.jpg",), texts=("in red",), negative=("buttons",))
    assert check_config(RunConfig(query=both, explicit=frozenset({"fusion", "text_weight", "negative_text"})),
                        _spell) is None
    assert check_config(RunConfig(serve=ServeSpec(enabled=True), explicit=frozenset({"fusion", "text_weight"})),
                        _spell) is None


def test_a_new_mode_is_one_entry(monkeypatch):
    """A mode added to the table is selected, has its own options checked, and is dispatched by runner.run."""
    from pipeline import modes, runner
    from pipeline.modes import Mode
    from pipeline.report import RunSummary

    ran = []
    probe = Mode("probe", "--probe", lambda c: c.top_k == 99, "pipeline.report:RunSummary",
                 options=frozenset({"max_matrix"}), holds_output=False)
    monkeypatch.setattr(modes, "MODES", (probe, *MODES))
    monkeypatch.setattr(Mode, "load", lambda self: (lambda cfg: ran.append(self.name) or RunSummary(mode=self.name)))
    cfg = replace(RunConfig(), top_k=99)
    assert selected_mode(cfg) is probe and check_config(cfg, _spell) is None
    assert check_config(RunConfig(explicit=frozenset({"max_matrix"})), _spell) == "--max-matrix needs --probe"
    assert runner.run(cfg).mode == "probe" and ran == ["probe"]


def test_flag_errors_are_one_line_with_a_suggestion(capsys):
    import main as cli

    assert cli.main(["--frame-stide", "3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "usage:" not in err
    assert "unrecognized arguments: --frame-stide 3; --frame-stide: did you mean --frame-stride?" in err
    assert cli.main(["--top-k", "0"]) == 2
    assert capsys.readouterr().err.startswith("main.py: error: argument --top-k: must be >= 1, got 0")


def test_help_shows_each_default_once_and_examples():
    import main as cli

    text = cli.build_parser().format_help()
    assert "(default: False)" not in text and "(default: ())" not in text and "(default: None)" not in text
    flat = " ".join(text.split())
    assert flat.count("(default: the backend in use)") == 1 and "(default: the backend in use) (default" not in flat
    for flag, default in (("--split", "train"), ("--batch-size", "32"), ("--top-k", "5"), ("--video_dir", "videos")):
        block = text[text.index(f"\n  {flag} ") :].split("\n  -")[1]
        assert f"(default: {default})" in " ".join(block.split()), flag
    assert "examples:" in text and "exit codes: 0 all went well" in text


def test_int8_profile_is_taken_with_a_static_export():
    """--export-onnx --int8-profile amx (static, the default quantization) runs; --quantization
    static-qdq with it is refused (its portable file has one graph)."""
    chosen = frozenset({"int8_profile"})
    assert check_config(RunConfig(export=ExportSpec(enabled=True, int8_profile="amx"), explicit=chosen), _spell) is None
    qdq = ExportSpec(enabled=True, quantization="static-qdq", int8_profile="vnni")
    assert "static-qdq files have one graph" in check_config(RunConfig(export=qdq, explicit=chosen), _spell)


def test_a_weight_may_be_given_to_a_picture_less_a_text_and_the_default_file_export_is_said():
    """--text-weight weighs a --negative-text too (combine subtracts weight x negative); and an
    export of another model to the default --onnx says that runs without --onnx now use it."""
    from pipeline.embedders import EmbedderSpec
    from pipeline.runner import default_file_note

    minus = RunConfig(query=QuerySpec(images=("a.jpg",), negative=("red",), text_weight=0.2),
                      explicit=frozenset({"text_weight", "negative_text"}))
    assert check_config(minus, _spell) is None
    default = EmbedderSpec()
    assert default_file_note(RunConfig()) is None
    note = default_file_note(RunConfig(embedder=EmbedderSpec(model="./tiny-clip")))
    assert note == (f"{default.onnx} is the default --onnx: gallery builds without --onnx or --model now embed with "
                    f"./tiny-clip, not {default.model}; export with --onnx FILE to keep the default")
    assert default_file_note(RunConfig(embedder=EmbedderSpec(model="./tiny-clip", onnx="mine.onnx"))) is None
