"""Every benchmark's --tiny mode, end to end, so that a change that breaks a benchmark fails here:
the same steps as the real measurement on a tiny random CLIP (tests/assets.py), a few small
pictures and rows. Each runs in this process through its main(argv) (those that start main.py, Ray
or --serve start them as the real benchmark does) and must print its table with numbers in it.

One --work folder serves the whole module, and the CLIP benchmarks take the session's tiny model
and its int8 export (tests/conftest.py) with --model and --onnx, so those are made once."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from benchmarks import (
    duplicates,
    embed,
    filtered,
    gpu_check,
    int8_cpus,
    int8_recipes,
    int8_runtimes,
    ray_vs_local,
    report,
    scale,
    segment,
    standard_run,
    update,
    video,
)

NUMBER = r"\d+(?:\.\d+)?"

try:  # OpenVINO is optional at runtime: without it the benchmarks say so and measure onnxruntime alone
    import openvino  # noqa: F401

    HAS_OPENVINO = True
except ImportError:
    HAS_OPENVINO = False
needs_openvino = pytest.mark.skipif(not HAS_OPENVINO, reason="OpenVINO is not installed (pip install openvino)")


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bench")


@pytest.fixture(scope="module")
def clip_args(work, tiny_clip, tiny_onnx) -> list[str]:
    return ["--work", str(work), "--model", str(tiny_clip), "--onnx", str(tiny_onnx)]


def run_tiny(module, capsys, *args: str) -> str:
    """The benchmark's main(["--tiny", *args]); its exit status must be 0; returns what it printed."""
    code = module.main(["--tiny", *args])
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]
    return out


def assert_rows(out: str, *patterns: str) -> None:
    """Each pattern (a regex; NUMBER stands for a number) matches a line of the output."""
    for pattern in patterns:
        assert re.search(pattern.replace("NUMBER", NUMBER), out, re.MULTILINE), f"no line like {pattern!r} in:\n{out}"


# In-process benchmarks: (module, what it is given, lines its output must have). "clip": the shared
# tiny model and its int8 file; "work": only a work folder; "": nothing.
IN_PROCESS = [
    (scale, "", [
        r"^ +N search +change +full pass +carried +asked again +same lists +recall full +recall carried$",
        r"^ +1,500 exact +-2\+2 +NUMBERs +NUMBERs +NUMBER +NUMBER +1\.0000 +1\.0000$",  # exact: recall 1 both ways
        r"^ +3,000 ivfpq +-30\+30 +NUMBERs +NUMBERs +NUMBER +NUMBER +NUMBER +NUMBER$",
        r"^kind +build +index .*recall@10",
        r"^flat +NUMBERs .* 1\.0000 ",
        r"^hnsw +NUMBERs .*'efSearch'",
        r"^ivfpq +NUMBERs .* NUMBER +NUMBER +NUMBERms +NUMBERms .*'nprobe'",
        r"^rule +step +vectors +update +action +recall@10 +held-out +nprobe +imbalance +ms/query  why$",
        r"^never +4 +4,000 +NUMBERs updated +NUMBER +NUMBER +NUMBER +NUMBER +NUMBER  $",  # never rebuilt
        r"^rule +4 +4,000 +NUMBERs (updated|rebuilt) +NUMBER +NUMBER +NUMBER +NUMBER +NUMBER ",
        r"^200 added +NUMBERs (updated|rebuilt) +NUMBER +NUMBER +NUMBER",
        r"^200 added, 200 removed +NUMBERs (updated|rebuilt) +NUMBER +NUMBER +NUMBER",
    ]),
    (duplicates, "", [
        r"^calibrated \(structure, colour, texture, centre, max_bits\): .*recall NUMBER at precision NUMBER",
        r"^\| transformation \| strength \| copies \| recall \| alone \| precision \|",
        r"^\| crop \| all \| NUMBER \| NUMBER \| NUMBER \| NUMBER \|",
        r"^\| overall \| \| NUMBER \| NUMBER \| NUMBER \| NUMBER \|",
        r"^\| colourway \| NUMBER \| NUMBER \|",
        r"^\| close colourway \| NUMBER \| NUMBER \|",
        r"^a shop's colourways: 1 product in 12 colours at least 40/255 apart in RGB: NUMBER of 12 photos grouped",
        r"^\| photo size \(2 originals\) \| recall \| precision \| jpeg q50 \| jpeg q70 \| resize 50% \|",
        r"^\| 128x128 " + r"\| NUMBER " * 10 + r"\|$",
        r"^band candidates, share of the rule's true pairs proposed: 1 table NUMBER",
        r"^\| 20,000 random \| find_duplicates \| NUMBER s",
        r"^\| 20,000 clustered \| check_new: 200 new \| NUMBER s",
    ]),
    (filtered, "", [
        r"^\| rows kept \| matching \| path \| p50 \| p95 \| recall@10 \|$",
        r"^\| 1% \| [\d,]+ \| exact among them \| NUMBER ms \| NUMBER ms \| NUMBER \|$",
        r"^\| 50% \| [\d,]+ \| exact among them \| NUMBER ms \| NUMBER ms \| 1\.000 \|$",
    ]),
    (embed, "clip", [
        r"^\| backend \| batch 1 \| batch 8 \| batch 32 \|$",
        r"^\| torch fp32 \| NUMBER \| NUMBER \| NUMBER \|$",
        r"^\| onnxruntime int8 \(static, default\) \| NUMBER \| NUMBER \| NUMBER \|$",
        r"^\| openvino int8 \(static, the VNNI graph\) \| NUMBER \| NUMBER \| NUMBER \|$",
        r"^\| embedding stage end to end .*16 JPEGs 192x256\) \| \| \| NUMBER \|$",
        r"^on OpenVINO: int8 \(static\) = NUMBER% of the int8 ceiling \(NUMBERx onnxruntime's\); fp32 = NUMBER% of",
        r"^onnxruntime GEMM peak here: fp32 NUMBER GFLOP/s",
        r"^  onnxruntime int8 \(static, default\): conversion .* = NUMBER% of kernel time$",
        r"^per photo and core \(one thread, best of 3; inference NUMBER ms at batch 32 on \d+ core\(s\)\):$",
        r"^  decode at the model's DCT scale +NUMBER ms$",
        r"^  duplicate signature +NUMBER ms$",
        r"^  resize for the model \(torch, --decode cpu-simd\) +NUMBER ms$",
        r"^  the item pipeline, whole +NUMBER ms \(the parts with Pillow's resize sum to NUMBER\)$",
        r"^end to end can reach at most \(of the int8 model-only rate\): NUMBER% with the decode alone; with the "
        r"model's pixels NUMBER% \(Pillow's resize\), NUMBER% \(torch's\); with the whole item pipeline NUMBER% "
        r"\(NUMBER% with torch's resize\); measured NUMBER%$",
        r"^\| FashionSigLIP ViT-B/16 \| onnxruntime int8 \(static, default\) \| NUMBER \| NUMBER \| NUMBER \|$",
        r"^FashionSigLIP ViT-B/16 / tiny-clip, torch fp32, batch 32: NUMBERx the speed",
        r"^  FashionSigLIP ViT-B/16 int8 static: .*MatMulIntegerToFloat NUMBER%",
    ]),
    (int8_recipes, "clip", [
        r"^\| qdq-out \| NUMBER \| 1\.00x \| NUMBER% \| NUMBER / NUMBER \| yes \|$",
        r"^\| float-out \| NUMBER \| NUMBERx \| NUMBER% \| NUMBER / NUMBER \| yes \|$",
        r"^\| float-out\+bias \| NUMBER \| NUMBERx \| NUMBER% \| NUMBER / NUMBER \| yes \|$",
        r"^\| conv-too\+bias \| NUMBER \| NUMBERx \| NUMBER% \| NUMBER / NUMBER \| yes \|$",
        r"^\| s8s8\+bias \| NUMBER \| NUMBERx \| NUMBER% \| NUMBER / NUMBER \| yes \|$",
        r"^\| all-ops \| NUMBER \| NUMBERx \| NUMBER% \| NUMBER / NUMBER \| yes \|$",
        r"^\| optimizer-static \| NUMBER \| NUMBERx \| NUMBER% \| NUMBER / NUMBER \| yes \|$",
        r"^\| optimizer-qattention \| NUMBER \| NUMBERx \| NUMBER% \| NUMBER / NUMBER \| (yes|no) \|$",
        r"^\| optimizer-qattention-static \| NUMBER \| NUMBERx \| NUMBER% \| NUMBER / NUMBER \| yes \|$",
        r"^\| skip-ln\+bias \| NUMBER \| NUMBERx \| NUMBER% \| NUMBER / NUMBER \| yes \|$",
        r"^\| qgemm-gelu\+bias \| NUMBER \| NUMBERx \| NUMBER% \| NUMBER / NUMBER \| yes \|$",
        r"^\| attn-float\+qgemm-gelu \| NUMBER \| NUMBERx \| NUMBER% \| NUMBER / NUMBER \| yes \|$",
        r"^\| nbits8 \| NUMBER \| NUMBERx \| NUMBER% \| NUMBER / NUMBER \| (yes|no) \|$",
    ]),
    (int8_cpus, "clip", [
        r"^\| int8 export \| weights \| img/s here \(batch 32\) \|",
        r"^\| static \| 7-bit \| NUMBER \| NUMBER / NUMBER \| NUMBER / NUMBER \(1 pictures\) \|$",
        r"^(\| static \| 8-bit \| NUMBER \||static 8-bit: export failed: )",  # 8-bit may fail its check on a CPU
    ]),
    (int8_runtimes, "clip", [
        r"^\| onnxruntime, qdq-out \(the default export of issue 29's day\), one session \| (NUMBER \| ){3}1\.00x \| "
        r"yes \| NUMBER \|$",
        r"^\| onnxruntime, the default export, one session \| (NUMBER \| ){3}NUMBERx \| yes \| 1\.00000 \|$",
        r"^\| onnxruntime, the default export, the pipeline's lanes \| (NUMBER \| ){3}NUMBERx \| yes \| 1\.00000 \|$",
        r"^\| OpenVINO, the (default export|VNNI profile's export), one session \| (NUMBER \| ){3}NUMBERx \| yes "
        r"\| (0\.99\d+|1\.00000) \|$",
        r"^\| OpenVINO, the (default export|VNNI profile's export), the pipeline's streams \| (NUMBER \| ){3}NUMBERx "
        r"\| yes \| (0\.99\d+|1\.00000) \|$",
        r"^  OpenVINO, the (default export|VNNI profile's export), the pipeline's streams: median NUMBER of NUMBER, "
        r"NUMBER$",
    ]),
    (segment, "work", [
        r"^\| model \| torch predict \| torch stage \|",
        r"^\| yolov8n-seg \| NUMBER ms \| NUMBER ms \| NUMBER% \| NUMBER ms \| NUMBER ms \| NUMBER% \| NUMBER / NUMBER",
    ]),
    (video, "clip", [
        r"^annotated video +clip wall +x real time +analysed/s +tracks",
        r"^on +NUMBERs +NUMBERx +NUMBER +3  read NUMBER%",
        r"^off +NUMBERs +NUMBERx +NUMBER +3  ",
    ]),
]  # fmt: skip


@pytest.mark.parametrize("module, given, patterns", IN_PROCESS, ids=[m.__name__.split(".")[-1] for m, *_ in IN_PROCESS])
def test_in_process_benchmark(module, given, patterns, request, capsys):
    args = request.getfixturevalue("clip_args") if given == "clip" else []
    if given == "work":
        args = ["--work", str(request.getfixturevalue("work"))]
    if not HAS_OPENVINO and any("openvino" in p.lower() for p in patterns):  # said instead of measured
        patterns = [p for p in patterns if "openvino" not in p.lower()] + [r"^OpenVINO is not installed \(pip install"]
    assert_rows(run_tiny(module, capsys, *args), *patterns)


def test_end_to_end_ceiling_is_inference_over_inference_plus_the_photo_work(capsys):
    """The benchmark's end-to-end ceilings: a photo costs its inference's core time (cores / model-only
    rate) plus its CPU work, so the stage reaches at most inference / (inference + work)."""
    parts = {embed.DECODE_PART: 3.29, "file sha256": 0.26, "duplicate signature": 2.76, embed.PILLOW_RESIZE: 1.73,
             embed.TORCH_RESIZE: 1.20, "normalize": 0.28, embed.WHOLE_ITEM: 10.53}
    embed.print_photo_parts(parts, model_rate=128.9, lanes=2, e2e=69.0)  # 15.52 ms of inference a photo
    out = capsys.readouterr().out
    assert "inference 15.52 ms at batch 32 on 2 core(s)" in out
    assert "(the parts with Pillow's resize sum to 8.32)" in out  # torch's resize not among them
    assert ("83% with the decode alone; with the model's pixels 75% (Pillow's resize), 76% (torch's); with the "
            "whole item pipeline 60% (61% with torch's resize); measured 54%") in out


def test_int8_recipes_alternates_rounds(clip_args, capsys):
    """--rounds 3: every recipe's rate measured three times in alternating order, the table giving
    each one's median of its three."""
    out = run_tiny(int8_recipes, capsys, *clip_args, "--recipes", "qdq-out,conv-too+bias", "--rounds", "3")
    assert_rows(out, r"^rates in 3 rounds, alternating order \(img/s, batch 32\):$",
                r"^  qdq-out: median NUMBER of NUMBER, NUMBER, NUMBER$",
                r"^  conv-too\+bias: median NUMBER of NUMBER, NUMBER, NUMBER$")
    for name in ("qdq-out", "conv-too\\+bias"):
        rates = [float(x) for x in re.search(rf"^  {name}: median \S+ of (.*)$", out, re.MULTILINE)[1].split(", ")]
        row = re.search(rf"^\| {name} \| (\S+) \|", out, re.MULTILINE)[1]
        assert row == f"{np.median(rates):.1f}", (row, rates)


def test_duplicates_measures_with_the_rule_it_calibrated(capsys, monkeypatch):
    """--measure-with calibrated: the figures are of the rule the run chose (a changed signature is
    tried before its rule is set), and the run says so; by default, of DEFAULT_RULE."""
    used = []
    real = duplicates.finder_score
    monkeypatch.setattr(duplicates, "finder_score", lambda g, rule: used.append(rule) or real(g, rule))
    out = run_tiny(duplicates, capsys, "--measure-with", "calibrated")
    chosen = re.search(r"^calibrated \(structure, colour, texture, centre, max_bits\): (\S+), (\S+), (\S+), (\S+), "
                       r"(\d+):", out, re.MULTILINE)
    assert chosen and "measured with the calibrated rule, not DEFAULT_RULE" in out
    rule = used[-1]
    assert [f"{v:.3f}" for v in (rule.structure, rule.colour, rule.texture, rule.centre)] == list(chosen.groups()[:4])
    assert rule.max_bits == int(chosen.group(5)) and rule != duplicates.dup.DEFAULT_RULE
    run_tiny(duplicates, capsys)
    assert used[-1] == duplicates.dup.DEFAULT_RULE


@pytest.mark.parametrize("flag, value, said", [("--calibrate-to", "2", "a precision in (0, 1], not 2"),
                                               ("--calibrate-to", "nan", "a precision in (0, 1], not nan"),
                                               ("--small", "-1", "a count of 0 or more, not -1")])
def test_duplicates_refuses_a_target_it_cannot_mean(flag, value, said, capsys):
    with pytest.raises(SystemExit):
        duplicates.main(["--tiny", flag, value])
    assert said in capsys.readouterr().err


def test_duplicates_signs_photos_as_a_gallery_run_does():
    """The benchmark's photos are signed from their JPEG files as a gallery run decodes them for
    FashionCLIP (a 768x1024 photo at 1/2 DCT scale), so the rule it calibrates is the one the
    pipeline's signatures need; a signature of the full-size picture is another."""
    from benchmarks.common import photo_like
    from pipeline.images import decode_image

    photo = duplicates.served(photo_like(7, 768, 1024))
    pixel, signature = duplicates.pipeline_signals(photo)
    half = decode_image(photo.info[duplicates.SERVED], 224).image
    assert half.size == (384, 512)
    assert pixel == duplicates.dup.pixel_hash(np.asarray(half), (768, 1024))
    assert np.array_equal(signature, duplicates.dup.look_signature(half))
    assert not np.array_equal(signature, duplicates.dup.look_signature(photo))


@pytest.mark.parametrize("compare, name", [("rn50", "open_clip RN50"), ("convnext", "open_clip ConvNeXt-T")])
def test_embed_compares_a_convolutional_tower(compare, name, clip_args, capsys):
    """--compare rn50 / convnext: open_clip's ResNet or ConvNeXt (tiny here), exported by the
    pipeline, measured beside the first model: its rates, its own ceiling, and its int8 file's
    kernel time by op type."""
    out = run_tiny(embed, capsys, *clip_args, "--compare", compare, "--int8", "static")
    assert_rows(out, rf"^\| {name} \| onnxruntime int8 \(static, default\) \| NUMBER \| NUMBER \| NUMBER \|$",
                r"^model: NUMBER GOP per image in matrix products and convolutions",
                rf"^{name}:\nmodel: NUMBER GOP per image",  # the second model's ceiling too
                rf"^  {name} int8 static: .*QLinearConv NUMBER%",
                rf"^  {name} int8 static: conversion \(Quantize/DequantizeLinear\) \+ float Add = NUMBER%")
    # the second model's own work counted, not the first's again
    first, second = re.findall(r"^model: (\S+) GOP per image", out, re.MULTILINE)
    assert float(first) != float(second), out


@needs_openvino
def test_embed_measures_both_runtimes_end_to_end(clip_args, capsys):
    """--e2e-runtime onnxruntime,openvino: the gallery stage on each runtime in turn, each against its
    own model-only rate."""
    out = run_tiny(embed, capsys, *clip_args, "--compare", "none", "--e2e-runtime", "onnxruntime,openvino",
                   "--e2e-images", "8")
    assert_rows(out, r"^end to end, --decode auto, round 1: NUMBER img/s",
                r"^end to end, --decode auto --onnx-runtime openvino, round 1: NUMBER img/s",
                r"^end to end, --decode auto --onnx-runtime openvino / its model-only rate at batch 32: NUMBER% "
                r"\(NUMBER img/s\)$")
    assert_shares_of_own_model(out)


def model_row_b32(out: str, name: str) -> float:
    return float(re.search(rf"^\| {re.escape(name)} \| {NUMBER} \| {NUMBER} \| ({NUMBER}) \|$", out, re.M).group(1))


def assert_shares_of_own_model(out: str) -> None:
    """Each end-to-end share printed is of its own runtime's model-only row (OpenVINO's of OpenVINO's)."""
    e2e = re.search(rf"^\| embedding stage end to end \(int8 static(, on OpenVINO)?, .*\| ({NUMBER}) \|$", out, re.M)
    model = embed.OV_STATIC if e2e.group(1) else embed.STATIC
    share = float(re.search(rf"^end to end / int8 model-only at batch 32: ({NUMBER})%$", out, re.M).group(1))
    assert abs(share - 100 * float(e2e.group(2)) / model_row_b32(out, model)) <= 1, out  # of printed figures
    for flags, share, rate in re.findall(rf"^end to end, (.*) / its model-only rate at batch 32: ({NUMBER})% "
                                         rf"\(({NUMBER}) img/s\)$", out, re.M):
        model = embed.OV_STATIC if "openvino" in flags else embed.STATIC
        assert abs(float(share) - 100 * float(rate) / model_row_b32(out, model)) <= 1, out


@needs_openvino
def test_embed_measures_openvino_first_against_its_own_model(clip_args, capsys):
    """--e2e-runtime openvino,onnxruntime: the table's end-to-end row is OpenVINO's, its share of
    OpenVINO's model-only rate (it was divided by onnxruntime's), and onnxruntime's of its own."""
    out = run_tiny(embed, capsys, *clip_args, "--compare", "none", "--e2e-runtime", "openvino,onnxruntime",
                   "--e2e-images", "8")
    assert_rows(out, r"^\| embedding stage end to end \(int8 static, on OpenVINO, batch 32, 8 JPEGs",
                r"^end to end, --decode auto / its model-only rate at batch 32: NUMBER% \(NUMBER img/s\)$")
    assert_shares_of_own_model(out)


@needs_openvino
def test_embed_says_openvino_refused_a_file_and_goes_on(clip_args, capsys, monkeypatch):
    """A file under its probes' bar on OpenVINO (Marqo-FashionSigLIP's architecture on an AMD EPYC;
    simulated here) is a line saying so, not the end of the run."""
    import numpy as np

    from pipeline.ovruntime import OpenVinoEmbedder

    run = OpenVinoEmbedder._run
    monkeypatch.setattr(OpenVinoEmbedder, "_run", lambda self, x: np.roll(run(self, x), 1, axis=1))
    out = run_tiny(embed, capsys, *clip_args, "--e2e-images", "0", "--compare", "none")
    assert_rows(out, r"^openvino int8 \(static, the VNNI graph\) +refused: .* failed its self-check on this CPU",
                r"^\| onnxruntime int8 \(static, default\) \| NUMBER \| NUMBER \| NUMBER \|$")
    assert "| openvino" not in out and "on OpenVINO:" not in out, out


def test_embed_with_no_end_to_end_photos_measures_the_model_alone(clip_args, capsys):
    """--e2e-images 0: no end-to-end run, and no row, ratio, stage times or ceiling of one (it had
    printed an empty run's 0.0 img/s, "end to end / int8 model-only: 0%" and zero stage times)."""
    out = run_tiny(embed, capsys, *clip_args, "--e2e-images", "0", "--compare", "none")
    assert_rows(out, r"^\| onnxruntime int8 \(static, default\) \| NUMBER \| NUMBER \| NUMBER \|$",
                r"^  onnxruntime int8 \(static, default\): conversion .* = NUMBER% of kernel time$")
    assert "end to end" not in out and "embed stage (wall)" not in out and "per photo" not in out, out


# Benchmarks that start main.py (and --serve) as a user would, on the shared tiny model.
MAIN_PY = [
    (standard_run, [
        r"^== N=16: wall NUMBER s \(NUMBER img/s end to end\), peak RSS NUMBER MiB$",
        r"^  \S.*\S +NUMBER s +NUMBER img/s$",  # the stages that took 0.1 s or more
    ]),
    (report, [
        r"^== 16-image standard run: wall NUMBER s; report written in NUMBER s",
        r"^\| --serve text query \| requests \| p50 \| p95 \| p99 \|$",
        r"^\| 1 client \| 10 \| NUMBER ms \| NUMBER ms \| NUMBER ms \|$",
        r"^\| 8 clients \| 10 \| NUMBER ms \| NUMBER ms \| NUMBER ms \|$",
    ]),
    (update, [
        r"^\| fresh build \| NUMBER s \| 100\.0% \|",
        r"^\| update: 4 added \| NUMBER s \| NUMBER% \|",
        r"^\|   \| update: added 4, changed 0, removed 0, unchanged 40 \|",
        r"^\|   \| update: added 0, changed 0, removed 4, unchanged 40 \|",
        r"^\| in 5-row files: nothing changed \| NUMBER s \| NUMBER% \|",
        r"^\|   \| update: added 0, changed 0, removed 0, unchanged 40 \|",
        r"^\| in 5-row files: 4 added, in new files \| NUMBER s \| NUMBER% \|",
    ]),
]  # fmt: skip


@pytest.mark.subprocess
@pytest.mark.parametrize("module, patterns", MAIN_PY, ids=["standard_run", "report", "update"])
def test_main_py_benchmark(module, patterns, clip_args, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # main.py's caches (dataset hashes): not the user's
    assert_rows(run_tiny(module, capsys, *clip_args), *patterns)


# What main.py prints when Ray itself could not be started (not when the Ray engine breaks).
RAY_START_FAILED = re.compile(r"Failed to (start|launch)|Could not (start|connect)|raylet|GCS server", re.IGNORECASE)


@pytest.mark.subprocess
def test_ray_vs_local(clip_args, capsys):
    pytest.importorskip("ray", reason="Ray is not installed, so it cannot start")
    try:
        out = run_tiny(ray_vs_local, capsys, *clip_args)
    except SystemExit as e:  # the benchmark stops with the failed run's stderr
        if RAY_START_FAILED.search(str(e)):
            pytest.skip(f"Ray could not start here: {str(e).splitlines()[-1]}")
        raise
    assert_rows(
        out,
        r"^\| engine \| wall \| images/s \| peak RSS, process tree \|$",
        r"^\| local \| NUMBER s \| NUMBER \| [\d,]+-[\d,]+ MiB \|$",
        r"^\| ray \| NUMBER s \| NUMBER \| [\d,]+-[\d,]+ MiB \|$",
        r"^stores equal: manifest byte-identical: True; embeddings max difference \S+$",
    )


@pytest.mark.subprocess
def test_gpu_check_dry_run(clip_args, capsys):
    out = run_tiny(gpu_check, capsys, *clip_args)
    assert_rows(
        out,
        r"^\| run \| exit \| embedding stage img/s \| after model load \|",
        r"^\| jpeg_16 \| 0 \| (NUMBER|-) \| NUMBER s \| NUMBER MiB \|",  # -: a stage under 0.05 s
        r"^\| jpeg_png10_16 \| 0 \| (NUMBER|-) \| NUMBER s \| NUMBER MiB \|",
        r"^\| lanes threads_2 \| 0 \| - \| NUMBER s \| NUMBER MiB \|",
        r"^\| lanes threads_16 \| 0 \| - \| NUMBER s \| NUMBER MiB \|",
        r"^\| segmentation \| 0 \| (NUMBER|-) \| NUMBER s \| NUMBER MiB \|",
    )


def test_int8_device_reports_each_step_and_fails_when_one_does(monkeypatch, tmp_path, capsys):
    """benchmarks.int8_device (one prepared command for a lent machine's CPU): each step in its own
    process pinned to two cores, its output in the report under its name; a step that fails or
    outlasts its limit is reported, the next still runs, and the command exits 1. (The two
    benchmarks it runs have their own --tiny tests above.)"""
    import os
    import sys
    import time

    from benchmarks import int8_device

    (tmp_path / "stub").mkdir()
    (tmp_path / "stub" / "fine_step.py").write_text("import sys\nprint('given', sys.argv[1:])\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "stub"))
    monkeypatch.setattr(int8_device, "STEPS", [("broken", ["benchmarks.no_such_benchmark"], 60),
                                               ("fine", ["fine_step"], 60)])
    affinity = os.sched_getaffinity(0)
    try:
        code = int8_device.main(["--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")])
    finally:
        os.sched_setaffinity(0, affinity)
    assert code == 1
    [report] = (tmp_path / "out").glob("int8_device_*.txt")
    text = report.read_text()
    assert text.startswith("machine: ") and f"pinned to cores {sorted(affinity)[:2]}" in text
    assert_rows(text, r"^## broken \(exit 1, NUMBER s\): -m benchmarks.no_such_benchmark --work ",
                r"^## fine \(exit 0, NUMBER s\): -m fine_step --work ", r"^given \['--work', ")
    assert "No module named benchmarks.no_such_benchmark" in text
    assert "failed: broken" in capsys.readouterr().out
    # past its limit: stopped with what it started (a child sleeping on), what it printed kept
    slow = ("import subprocess, sys, time; print('started', flush=True); "
            "print('on stderr', file=sys.stderr, flush=True); "
            "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
            "print('child', child.pid, flush=True); time.sleep(60)")
    started = time.perf_counter()
    text, ok = int8_device.run_step("slow", [sys.executable, "-c", slow], 3)
    assert time.perf_counter() - started < 30  # not held until the child's minute is over
    assert not ok and text.startswith("## slow (stopped after 3 s, ") and "started" in text and "on stderr" in text
    child = int(re.search(r"^child (\d+)$", text, re.MULTILINE).group(1))
    time.sleep(0.5)
    stat = Path(f"/proc/{child}/stat")  # gone, or dead and not yet reaped by its new parent
    assert not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")


def test_int8_device_pins_the_first_two_cores_it_may_use(monkeypatch):
    from benchmarks import int8_device

    pinned = []
    monkeypatch.setattr(int8_device.os, "sched_getaffinity", lambda pid: {7, 3, 12, 5})
    monkeypatch.setattr(int8_device.os, "sched_setaffinity", lambda pid, cores: pinned.append(list(cores)))
    assert int8_device.pin_two_cores() == [3, 5] and pinned == [[3, 5]]


def test_a_benchmark_expects_the_recipe_the_export_writes_for_each_tower(tiny_onnx, tmp_path, monkeypatch):
    """`Assets.onnx` expects the export's recipe under --int8-profile auto, read from the fp32 file
    beside the int8 one, parsed once per version of that file and CPU kind: on an AMX CPU (its
    profile patched in here) the AMX recipe for a tower with GELUs and the VNNI one for a ResNet's,
    with none (the export's fallback); on a VNNI CPU the VNNI recipe for a ViT and a ResNet, and the
    float-depthwise one for a ConvNeXt (depthwise convolutions and GELUs: int8graph.static_graph)."""
    from benchmarks import common
    from onnx import helper, numpy_helper
    from pipeline import export
    from pipeline.int8graph import AMX_RECIPE, DEPTHWISE_RECIPE
    from tests.helpers import float_graph_file

    def fp32_file(name: str, nodes: list, inits: list) -> Path:
        return float_graph_file(tmp_path, name, nodes, inits)

    conv = fp32_file("resnet", [helper.make_node("Conv", ["x", "w"], ["y"], name="conv")],
                     [numpy_helper.from_array(np.ones((4, 4, 3, 3), np.float32), "w")])
    convnext = fp32_file("convnext", [  # a depthwise convolution, then x * sigmoid(1.702 x)
        helper.make_node("Conv", ["x", "dw"], ["y"], group=4, pads=[1, 1, 1, 1]),
        helper.make_node("Mul", ["y", "c"], ["cy"]), helper.make_node("Sigmoid", ["cy"], ["s"]),
        helper.make_node("Mul", ["y", "s"], ["gelu"])],
        [numpy_helper.from_array(np.ones((4, 1, 3, 3), np.float32), "dw"),
         numpy_helper.from_array(np.array(1.702, np.float32), "c")])
    common._static_graph.cache_clear()
    monkeypatch.setattr(export, "int8_profile", lambda profile="auto": "amx")
    assert common.Assets._default_recipe(tiny_onnx, "static") == AMX_RECIPE  # CLIP: attention and QuickGelu
    for _ in range(2):
        assert common.Assets._default_recipe(conv, "static") == export.INT8_RECIPES["static"]
    assert common.Assets._default_recipe(conv, "dynamic") == export.INT8_RECIPES["dynamic"]  # no profile
    assert common.Assets._default_recipe(convnext, "static") == AMX_RECIPE
    monkeypatch.setattr(export, "int8_profile", lambda profile="auto": "vnni")
    assert common.Assets._default_recipe(tiny_onnx, "static") == export.INT8_RECIPES["static"]
    assert common.Assets._default_recipe(convnext, "static") == DEPTHWISE_RECIPE
    assert common.Assets._default_recipe(conv, "static") == export.INT8_RECIPES["static"]
    info = common._static_graph.cache_info()
    assert (info.misses, info.hits) == (6, 1)  # each file parsed once per CPU kind


def test_other_load_is_the_machines_busy_time_less_this_process():
    """OtherLoad: the machine's busy CPU time less this process's own, as a share of all the CPU time
    /proc/stat counted meanwhile and in cores; said in a note at 5% of the machine or half a core,
    not below both; unknown where the machine's time is not; the worst of several picked."""
    from benchmarks import common

    def load_of(machine: list, own: list, seconds: float = 4.0) -> common.OtherLoad:
        times, mine, clock = iter(machine), iter(own), iter([0.0, seconds])
        with common.OtherLoad(machine=lambda: next(times), own=lambda: next(mine), clock=lambda: next(clock)) as load:
            pass
        return load

    shared = load_of([(100.0, 400.0), (103.0, 408.0)], [10.0, 11.0])  # 2 s of others' in 8 s of the machine's
    assert shared.share == pytest.approx(0.25) and shared.cores == pytest.approx(0.5)
    assert shared.note("round 1") == ("note: other processes took 25% of the machine's CPU (0.5 core(s)) during "
                                      "round 1: its figure is not this code's alone (measure again on a quiet machine)")
    alone = load_of([(100.0, 400.0), (100.5, 408.0)], [10.0, 10.5])  # all of it this process's own
    assert alone.share == 0.0 and alone.cores == 0.0 and alone.note("round 1") is None
    # 64 cores for 10 s: one busy core of others' is 1.6% of the machine, yet said (a core); a fifth of one is not
    assert load_of([(0.0, 0.0), (10.0, 640.0)], [0.0, 0.0], 10.0).note("round 1") is not None
    assert load_of([(0.0, 0.0), (2.0, 640.0)], [0.0, 0.0], 10.0).note("round 1") is None
    unknown = load_of([None, None], [0.0, 0.0])
    assert unknown.share is None and unknown.note("round 1") is None
    assert common.OtherLoad.worst([alone, unknown, shared]) is shared and common.OtherLoad.worst([unknown]) is None


def test_other_load_sees_another_process_spinning():
    """On the real machine: a process this one has not waited for, spinning for the whole block, is
    another's load, about a core of it (more where other tests run beside), and said so."""
    pytest.importorskip("psutil")
    from benchmarks import common

    spin = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 3: pass"])
    try:
        time.sleep(0.3)  # started and spinning
        with common.OtherLoad() as load:
            time.sleep(1.0)
    finally:
        spin.wait()
    assert load.cores is not None and load.cores >= 0.7, (load.cores, load.share)
    assert load.note("the block") is not None


@needs_openvino
def test_openvino_is_measured_on_the_vnni_file_where_the_default_is_the_amx_one(tmp_path, tiny_clip, monkeypatch):
    """On an Intel CPU the export's `auto` writes the AMX profile's file, which OpenVINO does not
    read: the benchmarks give OpenVINO the VNNI profile's export of the same model instead (and the
    default file where OpenVINO reads it)."""
    from benchmarks.common import Assets, recipe_of
    from pipeline import export

    monkeypatch.setattr(export, "cpu_info", lambda: {"isa": ["avx2", "avx512f", "avx512_vnni", "amx_int8"]})
    monkeypatch.setattr(export, "cpu_vendor", lambda: "GenuineIntel")
    assets = Assets(tmp_path, tiny=True, model=tiny_clip)
    default, readable = assets.onnx("static"), assets.openvino_onnx()
    assert "+uint8-gelu" in recipe_of(default)
    assert readable != default and recipe_of(readable) == export.int8_recipe("static", "vnni")
    monkeypatch.setattr(export, "cpu_info", lambda: {"isa": ["avx2", "avx512f", "avx512_vnni"]})
    monkeypatch.setattr(export, "cpu_vendor", lambda: "AuthenticAMD")
    amd = Assets(tmp_path / "amd", tiny=True, model=tiny_clip)
    assert amd.openvino_onnx() == amd.onnx("static")


def test_alone_recall_does_not_count_a_copy_linked_to_its_original_through_another_copy(monkeypatch):
    """A 5% crop grouped with its original only through the q95 copy (which a catalogue with one
    copy per photo lacks): `score` counts it found, `alone_recall` does not."""
    import numpy as np

    from pipeline import duplicates as dup

    names = ["O", "B", "A", "X"]  # original, its q95 copy, its 5% crop, another original
    photos = [duplicates.Photo(0, "original"), duplicates.Photo(0, "jpeg", "q95"), duplicates.Photo(0, "crop", "5.0%"),
              duplicates.Photo(1, "original")]
    signals = dup.PhotoSignals(np.array(names), np.zeros((4, dup.SIGNATURE_SIZE), np.int8))
    gallery = duplicates.Gallery(photos, signals, {})
    links = {("O", "B"), ("B", "A")}  # the rule passes these pairs alone

    def linked(sig, rule):
        present = list(sig.pixel)
        group = sorted({present.index(x) for pair in links for x in pair if all(y in present for y in pair)})
        return [dup.DuplicateGroup(group, ["near"] * len(group), [0.0] * len(group))] if group else []

    monkeypatch.setattr(dup, "find_duplicates", linked)
    assert duplicates.finder_score(gallery, dup.DEFAULT_RULE).recall[("crop", "5.0%")] == 1.0
    alone = duplicates.alone_recall(gallery, dup.DEFAULT_RULE)
    assert alone[("crop", "5.0%")] == 0.0 and alone[("jpeg", "q95")] == 1.0 and alone[("overall", "")] == 0.5
