"""Video mode: frame sampling, colour order, outputs, and each bad input."""

from __future__ import annotations

import csv
import json
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import main as cli
from pipeline import video
from pipeline.errors import PipelineError, UsageError
from pipeline.persons import Person, box_iou, person_crop, with_masks
from pipeline.video import FrameReader
from pipeline.yolo import yolo_onnx_path
from tests import assets
from tests.helpers import row_files


def _video_argv(clip_dir, dataset, onnx, out, *extra: str) -> list[str]:
    """The video run's flags on clip_1 of clip_dir, then extra."""
    return [
        "--video_clip",
        "clip_1",
        "--video_dir",
        str(clip_dir),
        "--dataset",
        str(dataset),
        "--onnx",
        str(onnx),
        "--output-dir",
        str(out),
        *extra,
    ]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("videos")

    # frame i: blue level i (BGR order for VideoWriter), left half pure red in RGB terms
    def frame(i):
        f = np.zeros((120, 160, 3), np.uint8)
        f[:, :80] = (0, 0, 255)  # BGR red
        f[:, 80:] = (min(255, 2 * i), 0, 0)
        return f

    assets.write_video(d / "clip_1.mp4", 95, (160, 120), color_fn=frame)
    assets.write_video(d / "short.mp4", 10, (160, 120), color_fn=frame)
    (d / "text.mp4").write_text("not a video")
    (d / "empty.mp4").write_bytes(b"")
    return d


def test_frames_are_every_30th_and_rgb(clip_dir):
    reader = FrameReader(clip_dir / "clip_1.mp4", 30)
    frames = list(reader)
    assert [f.index for f in frames] == [0, 30, 60, 90]
    assert reader.frames_read == 95
    assert [round(f.time_s, 3) for f in frames] == [0.0, 1.0, 2.0, 3.0]
    left = frames[1].rgb[60, 20].astype(int)
    assert left[0] > 200 and left[1] < 50 and left[2] < 50  # red stays red: RGB order


def test_phone_clips_are_read_upright(tmp_path):
    # 64 wide, 32 high as coded, white on the left; shown turned clockwise: 32 wide, 64 high, white on top
    def frame(i):
        f = np.zeros((32, 64, 3), np.uint8)
        f[:, :16] = 255
        return f

    path = assets.mark_mp4_rotated_clockwise(assets.write_video(tmp_path / "phone.mp4", 3, (64, 32), color_fn=frame))
    assert video.probe(path)[2:] == (32, 64)
    frames = list(FrameReader(path, 1, small_size=(16, 32)))
    assert len(frames) == 3
    for f in frames:
        assert f.rgb.shape == (64, 32, 3) and f.small_bgr.shape == (32, 16, 3)
        assert f.rgb[:12].min() > 200 and f.rgb[20:].max() < 60  # white on top
        assert f.small_bgr[:5].min() > 200 and f.small_bgr[10:].max() < 60


def _damaged(path: Path, frame: int) -> Path:
    """An MJPG .avi with frame `frame`'s JPEG zeroed (its packet then fails to decode)."""
    data = bytearray(path.read_bytes())
    at = data.find(b"00dc", data.find(b"movi"))
    for _ in range(frame):
        at = data.find(b"00dc", at + 4)
    size = int.from_bytes(data[at + 4 : at + 8], "little")
    data[at + 8 : at + 8 + size] = bytes(size)
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("damaged, analysed", [(1, [0, 10, 20, 30]), (0, [1, 10, 20, 30]), (10, [0, 11, 20, 30])])
def test_a_damaged_packet_is_skipped_and_the_frames_keep_their_numbers(damaged, analysed, tmp_path):
    """A damaged packet is skipped, not fatal; its frame keeps its number, so every later frame is
    numbered as in the stream (they were one off after it); a frame due for analysis that is damaged
    gives its turn to the next good one. The first frame is decoded before the loop too (for its
    rotation): its damage is skipped there as well."""
    path = assets.write_video(
        tmp_path / "c.avi", 40, (64, 48), color_fn=lambda i: np.full((48, 64, 3), 5 * i, np.uint8)
    )
    _damaged(path, damaged)
    assert video.probe(path)[2:] == (64, 48)
    reader = FrameReader(path, 10)
    frames = list(reader)
    assert reader.damaged_packets == 1 and reader.frames_read == 40
    assert [f.index for f in frames] == analysed
    for f in frames:  # each frame is the source's frame of its number, and at its time
        assert f.rgb.mean() == pytest.approx(5 * f.index, abs=3)
        assert f.time_s == pytest.approx(f.index / 30, abs=1e-3)  # written at 30 fps


def test_times_are_the_frames_own_and_the_annotated_video_keeps_them(tmp_path):
    """A variable-rate clip (a phone's): 30 frames at 30 fps, then 30 at 5 fps. Each frame's time is
    its timestamp, not its number over the average rate, and the annotated video written from the
    frames shows each at that time."""
    from fractions import Fraction

    import av

    from pipeline.annotate import AnnotatedVideoWriter

    path, times = tmp_path / "vfr.mp4", [i / 30 if i < 30 else 1 + (i - 29) / 5 for i in range(60)]
    for made in (path, path.with_suffix(".mkv")):  # Matroska records no average rate: FFmpeg guesses 30
        with av.open(str(made), "w") as container:
            stream = container.add_stream("libx264", rate=30)
            stream.width, stream.height, stream.pix_fmt = 160, 120, "yuv420p"
            stream.codec_context.time_base = Fraction(1, 90000)
            for i, t in enumerate(times):
                frame = av.VideoFrame.from_ndarray(np.full((120, 160, 3), (i * 4) % 256, np.uint8), format="rgb24")
                frame.pts = round(t * 90000)
                for packet in stream.encode(frame):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
    reader = FrameReader(path, 15, small_size=(160, 120))
    frames = list(reader)
    assert [round(f.time_s, 3) for f in frames] == [round(t, 3) for t in times]
    assert [f.index for f in frames if f.analysed] == [0, 15, 30, 45]
    # the clip's length (the summary's "x real time"): its last frame's time and one more frame,
    # not its 60 frames at the container's rate (2 s at the 30 fps guessed for the .mkv)
    for made in (path, path.with_suffix(".mkv")):
        plain = FrameReader(made, 15)
        assert len(list(plain)) == 4 and 7.0 < plain.seconds < 7.25
    assert plain.frames_read / plain.fps == pytest.approx(2.0)
    writer = AnnotatedVideoWriter(tmp_path / "annotated.mp4", reader.fps, (160, 120))
    for f in frames:
        writer.write(f.small_bgr_pixels(), f.time_s)
    written = writer.close()
    with av.open(str(written)) as container:
        got = [float(f.time) for f in container.decode(container.streams.video[0])]
    assert np.allclose(got, times, atol=1e-3)


def test_an_encoder_that_fails_stops_the_run_with_its_error_and_never_hangs(tmp_path):
    """The encoder runs on its own thread behind a queue of 16 frames: when it fails (a full disk)
    the writer still takes frames until the caller sees the error, which it does at its next write,
    never blocked on a full queue."""
    import threading
    import types

    from pipeline.annotate import AnnotatedVideoWriter

    writer = AnnotatedVideoWriter(tmp_path / "a.mp4", 30, (64, 48))
    real, calls = writer._av, [0]

    def from_ndarray(frame, format):
        calls[0] += 1
        if calls[0] == 3:
            raise OSError(28, "No space left on device")
        return real.VideoFrame.from_ndarray(frame, format=format)

    writer._av = types.SimpleNamespace(VideoFrame=types.SimpleNamespace(from_ndarray=from_ndarray))
    raised: list[BaseException] = []

    def feed():
        try:
            for _ in range(200):  # far more than the queue holds
                writer.write(np.zeros((48, 64, 3), np.uint8))
        except PipelineError as e:
            raised.append(e)
        finally:
            writer.abort()

    thread = threading.Thread(target=feed, daemon=True)
    thread.start()
    thread.join(60)
    assert not thread.is_alive(), "the writer hung on a failed encoder"
    assert raised and "No space left on device" in str(raised[0])
    assert not list(tmp_path.iterdir())  # the unfinished file is removed


def test_the_annotated_video_is_720p_at_most_either_way_up_with_its_index_first(tmp_path):
    from pipeline.annotate import AnnotatedVideoWriter, output_size

    assert output_size(1920, 1080) == (1280, 720) and output_size(1080, 1920) == (720, 1280)
    assert output_size(2000, 90) == (1280, 58) and output_size(640, 480) == (640, 480)
    writer = AnnotatedVideoWriter(tmp_path / "a.mp4", 30000 / 1001, (64, 48))
    for i in range(10):
        writer.write(np.full((48, 64, 3), 20 * i, np.uint8))
    path = writer.close()
    data = path.read_bytes()
    assert 0 < data.find(b"moov") < data.find(b"mdat")  # a browser plays it before it has all of it
    import av

    with av.open(str(path)) as container:
        assert container.streams.video[0].average_rate == Fraction(30000, 1001)
    # a clip a pixel wide, or a long thin one: each side of the video at least 2 pixels, not 0
    assert output_size(1, 64) == (2, 64) and output_size(8000, 4) == (1280, 2)
    for w, h in (output_size(1, 64), output_size(8000, 4)):
        thin = AnnotatedVideoWriter(tmp_path / f"thin{w}.mp4", 25, (w, h))
        for i in range(3):
            thin.write(np.full((h, w, 3), 60 * i, np.uint8))
        with av.open(str(thin.close())) as container:
            assert container.streams.video[0].frames == 3


def test_a_tracks_crops_are_bounded_and_evenly_spread():
    from pipeline.video import MAX_CROPS_KEPT, CropSample

    sample = CropSample()
    tile = np.zeros((2, 2, 3), np.uint8)
    for i in range(1000):
        sample.add((float(i), 5.0 if i == 777 else 1.0, tile))
    assert len(sample.kept) <= MAX_CROPS_KEPT and sample.best is not None and sample.best[0] == 777.0
    times = [c[0] for c in sample.kept]
    assert times[0] == 0.0 and times[-1] >= 1000 - sample.step
    assert set(np.diff(times)) == {float(sample.step)}  # evenly spread


def test_box_iou_and_crops_with_masks():
    assert np.allclose(
        box_iou(np.array([[0, 0, 10, 10]]), np.array([[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30]])),
        [[1, 1 / 3, 0]],
    )
    frame = np.full((20, 20, 3), 7, np.uint8)
    mask = np.zeros((20, 20), bool)
    mask[2:8, 2:8] = True
    det = [Person(np.array([2, 2, 10, 10], np.float32), 0.9), Person(np.array([12, 12, 18, 18], np.float32), 0.8)]
    persons = with_masks(det, [Person(np.array([2, 2, 8, 8], np.float32), 0.9, mask)])
    (c0, m0), (c1, m1) = [(person_crop(frame, p), p.mask is not None) for p in persons]
    assert m0 and c0.shape == (8, 8, 3) and (c0[:6, :6] == 7).all() and (c0[7, 7] == 255).all()
    assert not m1 and (c1 == 7).all()  # no overlapping mask: crop kept as is


def persons(xyxy, scores):
    return [Person(np.array(b, np.float32), float(s)) for b, s in zip(xyxy, scores)]


class FakeDetector:
    """Two persons per frame at fixed boxes."""

    def __init__(self, *a, **k):
        pass

    def detect(self, frames):
        return [persons([[0, 0, 80, 120], [90, 10, 150, 110]], [0.95, 0.6]) for _ in frames]


def test_a_rerun_stopped_or_refused_leaves_the_last_results_and_their_section_whole(
        clip_dir, mixed_dataset, tiny_onnx, tmp_path, monkeypatch):
    from pipeline.webreport import read_section

    monkeypatch.setattr(video, "UltralyticsDetector", FakeDetector)
    out = tmp_path / "out"
    assert cli.main(_video_argv(clip_dir, mixed_dataset, tiny_onnx, out, "-q", "--index", "flat")) == 3
    sections = out / "outputs" / "report" / "sections.js"
    assert read_section(out / "outputs", "video_clip_1") is not None and "video_clip_1" in sections.read_text()
    results = out / "video_results" / "clip_1"
    kept = {f.name: f.read_bytes() for f in results.iterdir()}
    section = (read_section(out / "outputs", "video_clip_1"), sections.read_text())
    assert "results.jsonl" in kept and "annotated.mp4" in kept
    # a rerun refused over its flags (a filter's unknown column), or a damaged index, leaves them whole
    assert cli.main(_video_argv(clip_dir, mixed_dataset, tiny_onnx, out, "-q", "--use-embeddings",
                                "--filter", "colour = 'red'")) == 2
    index = out / "embeddings" / "index.faiss"
    good = index.read_bytes()
    index.write_bytes(bytes(len(good)))
    assert cli.main(_video_argv(clip_dir, mixed_dataset, tiny_onnx, out, "-q", "--use-embeddings")) != 0
    index.write_bytes(good)
    assert {f.name: f.read_bytes() for f in results.iterdir()} == kept
    assert read_section(out / "outputs", "video_clip_1") is not None and "video_clip_1" in sections.read_text()
    assert (read_section(out / "outputs", "video_clip_1"), sections.read_text()) == section  # the same, not rewritten

    class Stopped(FakeDetector):
        calls = 0

        def detect(self, frames):
            Stopped.calls += 1
            if Stopped.calls == 2:
                raise KeyboardInterrupt
            return super().detect(frames)

    # a rerun stopped midway (Ctrl-C, SIGTERM): the last complete run's results and section as they were,
    # and none of the stopped run's pictures beside them (it wrote into a folder of its own)
    monkeypatch.setattr(video, "UltralyticsDetector", Stopped)
    assert cli.main(_video_argv(clip_dir, mixed_dataset, tiny_onnx, out, "-q", "--use-embeddings")) == 130
    assert {f.name: f.read_bytes() for f in results.iterdir()} == kept
    assert (read_section(out / "outputs", "video_clip_1"), sections.read_text()) == section


def test_video_end_to_end_with_fake_detector(clip_dir, mixed_dataset, tiny_onnx, tmp_path, monkeypatch):
    monkeypatch.setattr(video, "UltralyticsDetector", FakeDetector)
    seen = []
    real = video.preprocess_batch
    monkeypatch.setattr(
        video, "preprocess_batch", lambda ims, cfg: seen.extend(np.asarray(i) for i in ims) or real(ims, cfg)
    )
    out = tmp_path / "out"
    code = cli.main(_video_argv(clip_dir, mixed_dataset, tiny_onnx, out, "-q", "--top-k", "3"))
    assert code == 3  # the gallery has the mixed dataset's two bad rows
    res = [json.loads(line) for line in (out / "video_results" / "clip_1" / "results.jsonl").read_text().splitlines()]
    assert [r["frame"] for r in res] == [0, 30, 60, 90]
    for r in res:
        assert [p["person"] for p in r["persons"]] == [0, 1]
        assert r["persons"][0]["box_xyxy"] == [0, 0, 80, 120] and r["persons"][1]["score"] == pytest.approx(0.6)
        for p in r["persons"]:
            assert [m["rank"] for m in p["matches"]] == [1, 2, 3]
            assert all(m["file"].startswith("img_") for m in p["matches"])
            assert all(m["source"] == f"{mixed_dataset}[{m['source_row']}]" for m in p["matches"])  # the user's name
            assert sorted(m["distance"] for m in p["matches"]) == [m["distance"] for m in p["matches"]]
    red = seen[0]
    assert red.shape == (120, 80, 3) and (red[..., 0] > 200).all() and (red[..., 2] < 50).all()
    pics = sorted((out / "video_results" / "clip_1").glob("frame_*.jpg"))
    assert [p.name for p in pics] == ["frame_000000.jpg", "frame_000030.jpg", "frame_000060.jpg", "frame_000090.jpg"]
    assert Image.open(pics[0]).height > 120 + 2 * 128  # the frame plus one match row per person
    # the cache mode reuses the gallery; the clip named by its path (its folder, its suffix) is the same
    # clip, its outputs in the output folder, nothing beside the clip
    before = sorted(p.name for p in clip_dir.iterdir())
    found = (out / "video_results" / "clip_1" / "results.jsonl").read_text()
    (out / "video_results" / "clip_1" / "results.jsonl").unlink()
    assert (
        cli.main(
            [
                "--video_clip",
                str(clip_dir / "clip_1.mp4"),
                "--top-k",
                "3",
                "--use-embeddings",
                "--onnx",
                str(tiny_onnx),
                "--output-dir",
                str(out),
                "-q",
            ]
        )
        == 3
    )
    assert (out / "video_results" / "clip_1" / "results.jsonl").read_text() == found  # the same clip, the same matches
    assert sorted(p.name for p in clip_dir.iterdir()) == before


def test_video_matches_honour_filter_and_group_by(clip_dir, tiny_onnx, tmp_path, monkeypatch, capsys):
    """--filter: every person's and every track's matches among the items the filter keeps;
    --group-by: one match per product."""
    monkeypatch.setattr(video, "UltralyticsDetector", FakeDetector)
    cells = [assets.jpeg_bytes(60 + i % 4 * 8, 90, seed=900 + i) for i in range(16)]
    kind = ["dress" if i % 4 == 0 else "coat" for i in range(16)]
    product = [f"P{i // 2}" for i in range(16)]
    data = assets.write_parquet_dataset(tmp_path / "shop", cells, extra={"category": kind, "item_id": product})
    out = tmp_path / "out"
    files = None
    for extra in ((), ("--filter", "category = 'dress'"), ("--group-by", "item_id")):
        capsys.readouterr()
        assert cli.main(_video_argv(clip_dir, data, tiny_onnx, out, "--top-k", "4", *extra)) == 0
        said = capsys.readouterr().out
        files = files or row_files(out)
        row_of = {f: r for r, f in files.items()}
        res = [json.loads(x) for x in (out / "video_results" / "clip_1" / "results.jsonl").read_text().splitlines()]
        found = [[row_of[m["file"]] for m in p["matches"]] for r in res for p in r["persons"]]
        tracks = json.loads((out / "video_results" / "clip_1" / "tracks.json").read_text())
        found += [[row_of[m["file"]] for m in t["matches"]] for t in tracks["tracks"]]
        assert found and all(len(rows) == 4 for rows in found)
        if extra and extra[0] == "--filter":
            assert all(kind[r] == "dress" for rows in found for r in rows)  # 4 of 16 items
            assert "--filter \"category = 'dress'\": matches among 4 of 16 items" in said
        elif extra:
            assert all(len({product[r] for r in rows}) == 4 for rows in found)
        else:
            assert any(kind[r] == "coat" for rows in found for r in rows)
            assert any(len({product[r] for r in rows}) < 4 for rows in found)  # two photos of a product
    # a filter that keeps no item: refused before the clip is decoded (every person would match none),
    # the last results left as they were
    results = (out / "video_results" / "clip_1" / "results.jsonl").read_bytes()
    assert cli.main(_video_argv(clip_dir, data, tiny_onnx, out, "--use-embeddings", "--filter",
                                "category = 'Dress'")) == 2
    assert ("--filter \"category = 'Dress'\" keeps none of the 16 gallery items: no person in the clip could be "
            "matched") in capsys.readouterr().err
    assert (out / "video_results" / "clip_1" / "results.jsonl").read_bytes() == results


def test_video_with_yolo_from_yaml(clip_dir, mixed_dataset, tiny_onnx, tmp_path):
    out = tmp_path / "out"
    code = cli.main(
        [
            "--video_clip",
            "clip_1",
            "--video_dir",
            str(clip_dir),
            "--det-model",
            "yolov8n.yaml",
            "--frame-stride",
            "45",
            "--dataset",
            str(mixed_dataset),
            "--onnx",
            str(tiny_onnx),
            "--output-dir",
            str(out),
            "-q",
        ]
    )
    assert code == 3
    res = [json.loads(line) for line in (out / "video_results" / "clip_1" / "results.jsonl").read_text().splitlines()]
    assert [r["frame"] for r in res] == [0, 45, 90]


@pytest.mark.parametrize(
    "clip, message",
    [("absent", "video not found"), ("text", "cannot open video.*H.264"), ("empty", "empty \\(0 bytes\\)")],
)
def test_bad_videos(clip, message, clip_dir, tmp_path, capsys):
    code = cli.main(["--video_clip", clip, "--video_dir", str(clip_dir), "--output-dir", str(tmp_path), "-q"])
    assert code == 1
    import re

    assert re.search(message, capsys.readouterr().err)


def test_a_clip_of_no_frames_is_said_as_such_not_sent_to_be_re_encoded(tmp_path):
    empty = assets.write_video(tmp_path / "zero.avi", 0, (64, 48))
    with pytest.raises(PipelineError, match="holds no frames: its video stream ended before its first") as e:
        video.Clip.from_file(empty, annotated_video=False)
    assert "re-encode" not in str(e.value)


def test_a_clip_of_damaged_packets_only_has_no_readable_frames(tmp_path):
    """Every packet damaged: refused as unreadable (counting damaged frames must not hide it), where a
    clip damaged at its end counts those frames as read."""
    path = assets.write_video(tmp_path / "c.avi", 5, (64, 48))
    for frame in range(5):
        _damaged(path, frame)
    reader = FrameReader(path, 10)
    with pytest.raises(PipelineError, match="has no readable frames"):
        list(reader)
    tail = _damaged(assets.write_video(tmp_path / "t.avi", 12, (64, 48)), 11)
    reader = FrameReader(tail, 5)
    assert [f.index for f in reader] == [0, 5, 10] and reader.frames_read == 12 and reader.damaged_packets == 1


def test_a_clip_whose_tags_are_not_utf8_is_read(tmp_path):
    """A handler name in Latin-1 ("Vidéo"), which players read: it was an unexpected UnicodeDecodeError."""
    path = assets.write_video(tmp_path / "latin1.mp4", 20, (64, 48))
    data = path.read_bytes()
    assert data.count(b"VideoHandler") == 1
    path.write_bytes(data.replace(b"VideoHandler", "VidéoHandler".encode("latin-1")))
    assert video.probe(path) == (20, 30.0, 64, 48)
    assert [f.index for f in FrameReader(path, 10)] == [0, 10]


def test_a_clip_cut_short_is_said_not_passed_over(tmp_path):
    """A file cut short (an interrupted copy): the frames it has are read, and the summary says how many
    of those its container announces, where the progress bar said 100% and nothing else did."""
    path = assets.write_video(tmp_path / "whole.avi", 60, (64, 48),
                              color_fn=lambda i: np.full((48, 64, 3), 4 * i, np.uint8))
    data = path.read_bytes()
    cut = tmp_path / "cut.avi"
    cut.write_bytes(data[: int(len(data) * 0.6)])
    clip = video.Clip.from_file(cut, annotated_video=False)
    reader = FrameReader(cut, 10)
    assert [f.index for f in reader] == [0, 10, 20] and clip.frames_hint == 60
    said = video.short_read_note(clip, reader.frames_read, reader.seconds)
    assert said is not None and said.startswith(f"the clip ended after {reader.frames_read} of the 60 frames its "
                                                f"container announces ({reader.seconds:.1f} of 2.0 s)")
    whole = FrameReader(path, 10)
    list(whole)
    assert video.short_read_note(video.Clip.from_file(path, False), whole.frames_read, whole.seconds) is None


def test_an_mp4_cut_before_its_index_is_said_to_be_cut_short(tmp_path):
    """An MP4 writes its index (moov) last: cut before it, nothing can be read, and re-encoding (the
    remedy for a codec it cannot read) cannot help; copying it again can."""
    from pipeline.errors import PipelineError

    path = assets.write_video(tmp_path / "whole.mp4", 30, (64, 48))
    data = path.read_bytes()
    assert data.rfind(b"moov") > data.find(b"mdat")  # the index after the frames, as OpenCV writes it
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(PipelineError, match=r"it is cut short \(its MP4 index, the moov atom, is missing.*copy or "
                                            r"download it again"):
        video.Clip.from_file(cut, annotated_video=False)
    assert video.mp4_cut_short(cut) and not video.mp4_cut_short(path)
    assert not video.mp4_cut_short(assets.write_video(tmp_path / "whole.avi", 5, (64, 48)))  # no MP4 boxes
    assert not video.mp4_cut_short(tmp_path / "missing.mp4")  # unreadable: not said to be cut short


def test_a_clip_is_found_whatever_the_case_of_its_suffix(tmp_path):
    """A phone names its clips IMG_1234.MOV; a lower-case suffix is still preferred, in the usual order."""
    from pipeline.video import find_video

    (tmp_path / "IMG_0001.MOV").write_bytes(b"x")
    assert find_video(tmp_path, "IMG_0001") == tmp_path / "IMG_0001.MOV"
    assert find_video(tmp_path, "IMG_0001.MOV") == tmp_path / "IMG_0001.MOV"
    (tmp_path / "look.AVI").write_bytes(b"x")
    (tmp_path / "look.Mp4").write_bytes(b"x")
    assert find_video(tmp_path, "look") == tmp_path / "look.Mp4"  # .mp4 first, as in the lower-case order
    (tmp_path / "walk.avi").write_bytes(b"x")
    assert find_video(tmp_path, "walk") == tmp_path / "walk.avi"
    # the clip's own path, where --video_dir (its default, videos) does not hold it
    assert find_video(tmp_path / "videos", str(tmp_path / "walk.avi")) == tmp_path / "walk.avi"
    with pytest.raises(PipelineError, match=f"video not found: {tmp_path / 'gone.mp4'}; check --video_clip"):
        find_video(tmp_path / "videos", str(tmp_path / "gone.mp4"))
    # a camcorder's or a broadcast's container: by its name alone, or whole whatever its suffix
    (tmp_path / "cam.MTS").write_bytes(b"x")
    (tmp_path / "feed.xyz").write_bytes(b"x")
    assert find_video(tmp_path, "cam") == tmp_path / "cam.MTS"
    assert find_video(tmp_path / "videos", str(tmp_path / "feed.xyz")) == tmp_path / "feed.xyz"
    assert find_video(tmp_path, "feed.xyz") == tmp_path / "feed.xyz"
    with pytest.raises(UsageError, match=f"--video_dir {tmp_path / 'walk.avi'} is a file, not a folder of clips"):
        find_video(tmp_path / "walk.avi", "clip_1")
    # a clip name mistyped: the folder's clips are named; a folder that is not there is said as such
    with pytest.raises(PipelineError, match=r"\(also looked for .*\); its clips: IMG_0001.MOV, cam.MTS, look.AVI, "
                                            r"look.Mp4, walk.avi; check --video_dir and --video_clip"):
        find_video(tmp_path, "wlak")
    with pytest.raises(PipelineError, match=f"video not found: the folder {tmp_path / 'vidoes'} does not exist; "
                                            "check --video_dir"):
        find_video(tmp_path / "vidoes", "clip_1")
    with pytest.raises(PipelineError, match=r"\); .*empty holds no video file; check"):
        (tmp_path / "empty").mkdir()
        find_video(tmp_path / "empty", "clip_1")


def test_two_files_of_one_clip_name_are_said(tmp_path, caplog):
    from pipeline.video import find_video

    for name in ("walk.MOV", "walk.avi"):
        (tmp_path / name).write_bytes(b"x")
    with caplog.at_level("WARNING"):
        assert find_video(tmp_path, "walk") == tmp_path / "walk.avi"
    assert "walk.avi, walk.MOV are all clip walk: playing walk.avi" in caplog.text


def test_a_few_frames_lost_inside_a_clip_are_said():
    """A damaged MJPG lost 3 of 90 frames (the decoder resynchronised) without a word: under 5% the
    cut-short note stayed silent, and the frame numbers after them were early."""
    from types import SimpleNamespace

    clip = SimpleNamespace(frames_hint=90, fps=30.0, path=Path("walk.AVI"))
    assert video.short_read_note(clip, 90, 3.0) is None and video.short_read_note(clip, 89, 3.0) is None
    said = video.short_read_note(clip, 87, 2.9)
    assert said.startswith("3 of the 90 frames its container announces were not read") and "early" in said
    assert "cut short" in video.short_read_note(clip, 40, 1.3)
    # a count that is estimated (Matroska) or may leave a frame or two out (an MP4's edit list): not said
    assert video.short_read_note(SimpleNamespace(frames_hint=90, fps=30.0, path=Path("walk.mkv")), 87, 2.9) is None


def test_video_shorter_than_stride_is_said(clip_dir, mixed_dataset, tiny_onnx, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(video, "UltralyticsDetector", FakeDetector)
    out = tmp_path / "o"
    code = cli.main(
        [
            "--video_clip",
            "short",
            "--video_dir",
            str(clip_dir),
            "--dataset",
            str(mixed_dataset),
            "--onnx",
            str(tiny_onnx),
            "--output-dir",
            str(out),
        ]
    )
    assert code == 3
    assert "10 frame(s), fewer than --frame-stride 30" in capsys.readouterr().out
    assert len((out / "video_results" / "short" / "results.jsonl").read_text().splitlines()) == 1


def test_a_clip_named_by_its_path_says_the_video_dir_typed_is_not_used(clip_dir, mixed_dataset, tiny_onnx, tmp_path,
                                                                       monkeypatch, capsys):
    monkeypatch.setattr(video, "UltralyticsDetector", FakeDetector)
    clip = next(clip_dir.glob("short.*"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    assert cli.main(["--video_clip", str(clip), "--video_dir", str(elsewhere), "--dataset", str(mixed_dataset),
                     "--onnx", str(tiny_onnx), "--output-dir", str(tmp_path / "o")]) == 3
    said = " ".join(capsys.readouterr().out.split())
    assert f"--video_clip {clip} is a file of its own: --video_dir {elsewhere} is not used" in said


def test_zero_frame_stream_is_an_error(tmp_path):
    import cv2

    p = tmp_path / "zero.avi"
    w = cv2.VideoWriter(str(p), cv2.VideoWriter_fourcc(*"MJPG"), 30, (32, 32))
    w.release()
    with pytest.raises(PipelineError, match="no readable frames|cannot open|empty"):
        list(FrameReader(p, 30))


def test_video_flags_need_a_clip(capsys):
    assert cli.main(["--frame-stride", "10"]) == 2
    assert "--frame-stride needs --video_clip" in capsys.readouterr().err
    assert cli.main(["--det-backend", "onnx", "--frame-stride", "3", "--video_dir", "v"]) == 2
    assert "error: --det-backend, --frame-stride, --video_dir need --video_clip NAME" in capsys.readouterr().err
    # a second clip replaced the first without a word: a run follows one clip
    assert cli.main(["--video_clip", "clip_1", "--video-clip", "clip_2", "--use-embeddings"]) == 2
    assert "--video-clip given twice (clip_1, clip_2): a run follows one clip; run once for each" in (
        capsys.readouterr().err)


def test_a_models_own_task_is_read_a_segmentation_model_detects_and_a_detection_model_does_not_segment(tmp_path):
    """--det-model with -seg weights finds the persons (its boxes; as an ONNX export its mask
    coefficients were read as classes and nobody was found, with torch its masks failed a size
    check); --seg-model with detection weights is refused saying what it needs."""
    import re

    from pipeline.errors import PipelineError
    from pipeline.yolo import SegmentSpec, make_segmenter, yolo_onnx_path

    # named without "-seg": Ultralytics before 8.4 guesses an export's task from its name alone
    seg, det = tmp_path / "seg" / "people.pt", tmp_path / "det" / "person-det.pt"
    for pt, yaml in ((seg, "yolov8n-seg.yaml"), (det, "yolov8n.yaml")):
        pt.parent.mkdir()
        assets.person_yolo(yaml, score_gain=0.1, score_bias=2.0).save(pt)
    frames = [np.asarray(assets.rgb_image(12, 9, seed=70 + i).resize((160, 120), Image.BICUBIC)) for i in range(3)]
    found = []
    for backend, runs in (("auto", "onnx"), ("torch", "torch")):
        d = video.UltralyticsDetector(str(seg), 0.25, device="cpu", imgsz=160, backend=backend)
        assert d.backend == runs  # auto: its verified export, read as the segmentation model it records
        d.model.overrides["max_det"] = 4
        found.append([_arrays(f) for f in d.detect(frames)])
    assert [len(x.xyxy) for x in found[0]] == [len(y.xyxy) for y in found[1]]
    assert sum(len(x.xyxy) for x in found[0]) >= 3
    for x, y in zip(*found):
        assert not len(x.xyxy) or np.abs(x.xyxy - y.xyxy).max() < 0.05
    with pytest.raises(PipelineError, match="is a YOLO detect model: --seg-model needs a segmentation model"):
        make_segmenter(SegmentSpec(model=str(det)), device="cpu")
    # once a video run made its ONNX export, the refusal still names the file passed, not the cached export
    video.UltralyticsDetector(str(det), 0.25, device="cpu", imgsz=160)
    assert yolo_onnx_path(det).is_file()
    with pytest.raises(PipelineError, match=f"^{re.escape(str(det))} is a YOLO detect model: --seg-model needs"):
        make_segmenter(SegmentSpec(model=str(det)), device="cpu")
    from pipeline.yolo import _recorded_task

    assert _recorded_task(str(yolo_onnx_path(seg))) == "segment"  # what the export records, whatever its name


def test_detector_runs_its_verified_onnx_export_with_the_same_boxes(tmp_path):
    pt = tmp_path / "person-det.pt"
    assets.person_yolo("yolov8n.yaml", score_gain=0.1, score_bias=2.0).save(pt)
    onnx_det = video.UltralyticsDetector(str(pt), 0.25, device="cpu", imgsz=160)
    torch_det = video.UltralyticsDetector(str(pt), 0.25, device="cpu", imgsz=160, backend="torch")
    assert (onnx_det.backend, torch_det.backend) == ("onnx", "torch")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([pt.name, yolo_onnx_path(pt).name])
    for d in (onnx_det, torch_det):
        d.model.overrides["max_det"] = 4
    frames = [np.asarray(assets.rgb_image(12, 9, seed=70 + i).resize((160, 120), Image.BICUBIC)) for i in range(3)]
    a, b = ([_arrays(f) for f in det.detect(frames)] for det in (torch_det, onnx_det))
    assert [len(x.xyxy) for x in a] == [len(x.xyxy) for x in b] and sum(len(x.xyxy) for x in a) >= 3
    for x, y in zip(a, b):
        assert np.abs(x.xyxy - y.xyxy).max() < 0.05 and np.abs(x.scores - y.scores).max() < 1e-3
        assert len(set(np.round(x.scores, 4))) == len(x.scores)  # distinct scores: the order is not a tie-break


def _arrays(found):
    """A frame's persons as arrays: .xyxy float32 (N, 4), .scores float32 (N,)."""
    from types import SimpleNamespace

    return SimpleNamespace(
        xyxy=np.array([p.box_xyxy for p in found], np.float32).reshape(-1, 4),
        scores=np.array([p.confidence for p in found], np.float32),
    )


class _CapturingModel:
    """Stands in for an Ultralytics YOLO: records what predict() receives, finds nobody."""

    def __init__(self):
        self.sources = []

    def predict(self, source, **kw):
        self.sources.extend(source)

        class Result:
            boxes = None
            masks = None
            nms_persons = 0  # what yolo.counting_predictor records

        return [Result() for _ in source]


def test_detector_and_segmenter_hand_ultralytics_bgr():
    from pipeline.yolo import SegmentSpec, UltralyticsSegmenter

    rgb = np.zeros((16, 16, 3), np.uint8)
    rgb[..., 0] = 250  # red in RGB
    rgb[..., 2] = 10
    det = object.__new__(video.UltralyticsDetector)
    det.model, det.conf, det.device, det.imgsz = _CapturingModel(), 0.25, None, 640
    assert det.detect([rgb])[0] == []
    seg = object.__new__(UltralyticsSegmenter)
    seg.model, seg.spec, seg.device, seg.predict_seconds = _CapturingModel(), SegmentSpec(), None, 0.0
    seg.batch, seg.rect = 1, True
    assert seg.segment([rgb]) == [[]]
    for model in (det.model, seg.model):
        got = model.sources[0]
        assert got.shape == rgb.shape and (got[..., 2] == 250).all() and (got[..., 0] == 10).all()  # BGR


class ThreeWithEmptyMiddle:
    """Three detections a frame; #1 has no area, so it yields no crop."""

    def __init__(self, *a, **k):
        pass

    def detect(self, frames):
        return [persons([[0, 0, 70, 120], [100, 50, 100, 50], [90, 10, 150, 110]], [0.9, 0.8, 0.7]) for _ in frames]


def test_person_numbers_stay_detection_indices_when_a_crop_is_empty(
    clip_dir, mixed_dataset, tiny_onnx, tmp_path, monkeypatch
):
    monkeypatch.setattr(video, "UltralyticsDetector", ThreeWithEmptyMiddle)
    out = tmp_path / "out"
    assert cli.main(_video_argv(clip_dir, mixed_dataset, tiny_onnx, out, "-q", "--top-k", "2")) == 3
    for line in (out / "video_results" / "clip_1" / "results.jsonl").read_text().splitlines():
        persons = json.loads(line)["persons"]
        assert [p["person"] for p in persons] == [0, 2]  # the numbers drawn on the frame (#0, #2)
        assert persons[1]["box_xyxy"] == [90, 10, 150, 110] and persons[1]["score"] == pytest.approx(0.7)


def test_box_iou_values_and_degenerate_boxes():
    a = [[0, 0, 4, 2]]  # 8 px, wider than tall: x and y extents differ
    b = np.array([[2, 0, 6, 2], [0, 1, 4, 3], [0, 0, 4, 2], [5, 5, 5, 9], [3, 3, 1, 1]], np.float64)
    got = box_iou(a, b)
    assert got.dtype == np.float32 and got.shape == (1, 5)
    assert np.allclose(got, [[4 / 12, 4 / 12, 1.0, 0.0, 0.0]])
    assert box_iou(np.zeros((0, 4)), b).shape == (0, 5)
    assert box_iou([[1, 1, 1, 1]], [[1, 1, 1, 1]])[0, 0] == 0.0  # empty boxes: no overlap, not NaN
    empty = np.tile([[2.0, 2, 2, 5]], (64, 1))
    for _ in range(3):  # freed memory full of non-zeros, where an unwritten result would come from
        junk = np.full((64, 64), 7.0, np.float32)
        del junk
        assert not box_iou(empty, empty).any()
    # boxes smaller than a pixel (normalized coordinates) are boxes like any other
    assert np.allclose(box_iou([[0, 0, 0.5, 0.5]], [[0, 0, 0.5, 0.5], [0, 0, 0.5, 0.25]]), [[1.0, 0.5]])


def test_with_masks_attaches_the_best_mask_at_the_threshold_and_keeps_the_rest():
    mask_a, mask_b = np.zeros((10, 10), bool), np.ones((10, 10), bool)
    det = [Person(np.array([0, 0, 4, 4], np.float32), 0.8), Person(np.array([6, 6, 10, 10], np.float32), 0.7)]
    masked = [
        Person(np.array([0, 0, 4, 2], np.float32), 0.3, mask_a),
        Person(np.array([0, 0, 4, 4], np.float32), 0.2, mask_b),
    ]
    out = with_masks(det, masked, min_iou=0.5)
    assert out[0].mask is mask_b and out[0].confidence == 0.8 and np.array_equal(out[0].box_xyxy, det[0].box_xyxy)
    assert out[1] is det[1]  # no overlap: the detection as it was
    assert with_masks(det, masked, min_iou=1.0)[0].mask is mask_b  # IoU exactly at the threshold counts
    assert with_masks([], masked) == [] and with_masks(det, []) == det


def test_video_honours_index_and_matches_exact_search(clip_dir, mixed_dataset, tiny_onnx, tmp_path, monkeypatch):
    """--index hnsw: every person and track is searched through the HNSW index (counted), and on a small
    gallery it finds the same matches as exact search."""
    from pipeline.index import GalleryIndex

    monkeypatch.setattr(video, "UltralyticsDetector", FakeDetector)
    calls = []
    real_search = GalleryIndex.search
    monkeypatch.setattr(GalleryIndex, "search", lambda self, q, k, **kw: calls.append(self.info.kind) or real_search(
        self, q, k, **kw))

    def results(out, *flags):
        assert cli.main(_video_argv(clip_dir, mixed_dataset, tiny_onnx, out, "-q", "--top-k", "3", *flags)) == 3
        folder = out / "video_results" / "clip_1"
        lines = [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]
        return lines, json.loads((folder / "tracks.json").read_text())["tracks"]

    exact = results(tmp_path / "exact", "--index", "none")
    assert calls == []
    indexed = results(tmp_path / "hnsw", "--index", "hnsw")
    persons = sum(len(r["persons"]) for r in indexed[0])
    assert persons == 8 and calls and set(calls) == {"hnsw"} and len(calls) >= persons // 2
    assert json.loads((tmp_path / "hnsw" / "embeddings" / "index.json").read_text())["kind"] == "hnsw"

    # the index computes distances in its own order: equal up to float32 rounding (printed to 1e-6)
    pairs = [(a, b) for la, lb in zip(indexed[0], exact[0], strict=True)
             for pa, pb in zip(la["persons"], lb["persons"], strict=True)
             for a, b in zip(pa["matches"], pb["matches"], strict=True)]
    assert len(pairs) == persons * 3 and all(abs(a.pop("distance") - b.pop("distance")) <= 2e-6 for a, b in pairs)
    assert indexed == exact  # the rest: the same frames, persons, tracks, matches in the same order


class Nobody:
    """A detector that finds nobody."""

    def __init__(self, *a, **k):
        pass

    def detect(self, frames):
        return [[] for _ in frames]


def _summary(text: str) -> dict[str, list[str]]:
    """A printed summary's lines by kind ("stages", "note", "output"); stages split into their labels."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        kind, _, rest = line.partition(":")
        if kind in ("stages", "note", "output"):
            out.setdefault(kind, []).extend(rest.strip().split(", ") if kind == "stages" else [rest.strip()])
    return out


@pytest.mark.parametrize(
    "det_flags, why",
    [
        (["--det-model", "yolov8n.yaml"], "--det-model yolov8n.yaml is a model .yaml, which builds the network with "
                                          "random weights; pass trained weights"),
        ([], "at --det-conf 0.25: try a lower --det-conf (e.g. 0.125)"),
        (["--det-conf", "0.6"], "at --det-conf 0.6: try a lower --det-conf (e.g. 0.3)"),
    ],
)
def test_a_video_where_nobody_is_found_says_why_and_lists_only_real_outputs(
    det_flags, why, clip_dir, mixed_dataset, tiny_onnx, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(video, "UltralyticsDetector", Nobody)
    out = tmp_path / "out"
    assert cli.main(_video_argv(clip_dir, mixed_dataset, tiny_onnx, out, *det_flags)) == 3
    printed = capsys.readouterr()
    said = _summary(printed.out)
    note = "no person found in any of the 4 analysed frame(s)"
    assert [n for n in said["note"] if n.startswith(note)] == [next(n for n in said["note"] if why in n)]
    assert f"WARNING pipeline.video: {note}" in printed.err and why in printed.err  # the log says it too
    folder = out / "video_results" / "clip_1"
    assert not list(folder.glob("track_*.jpg"))
    assert not any("track_" in o for o in said["output"])  # no contact sheet is listed when none was written
    assert f"tracks -> {folder / 'tracks.json'}" in said["output"]
    assert f"frame pictures -> {folder}/frame_*.jpg (4)" in said["output"]
    assert len(list(folder.glob("frame_*.jpg"))) == 4


def test_a_video_runs_stages_read_once_each(clip_dir, mixed_dataset, tiny_onnx, tmp_path, monkeypatch, capsys):
    """One label per stage, the model loaded under one name, the frame loop's steps under their whole, and
    the contact sheets listed when tracks were found."""
    monkeypatch.setattr(video, "UltralyticsDetector", FakeDetector)
    out = tmp_path / "out"
    assert cli.main(_video_argv(clip_dir, mixed_dataset, tiny_onnx, out)) == 3
    said = _summary(capsys.readouterr().out)
    labels = [s.rsplit(" ", 2)[0] for s in said["stages"]]
    assert len(labels) == len(set(labels)), labels
    assert "load model" in labels and not any("embedder" in s for s in labels)
    assert not any(s.split()[0] == s.split()[-1] for s in labels if len(s.split()) > 1)  # no "video video"
    loop = labels.index("clip (frame loop)")
    steps = ["read frames", "detect persons", "embed crops", "match", "track", "frame pictures", "annotated video"]
    assert labels[loop + 1 : loop + 1 + len(steps)] == ["  " + s for s in steps]  # its parts, indented, in order
    assert "  segment persons" not in labels  # this run does not segment
    folder = out / "video_results" / "clip_1"
    sheets = sorted(folder.glob("track_*.jpg"))
    assert sheets and f"track sheets -> {folder}/track_*.jpg ({len(sheets)})" in said["output"]


def test_a_segmented_gallerys_matches_name_the_crops_person(clip_dir, tiny_onnx, tmp_path, monkeypatch, browser):
    """Against a segmented gallery a match is a person crop: results.jsonl and tracks.json give its
    person, and the contact sheets, the report's video section and its query table name it as the
    query labels do (`people[5]#p1`). Two persons of one photo whose crops have the same bytes (one
    file) are told apart only so."""
    from pipeline import galleries
    from pipeline.webreport import read_section
    from tests.test_segment import FakeSegmenter  # image i: i % 3 persons (its red level is i)
    from tests.test_webreport import console_errors, wait

    monkeypatch.setattr(galleries, "make_segmenter", lambda spec, device: FakeSegmenter())
    monkeypatch.setattr(video, "UltralyticsDetector", FakeDetector)
    cells = [assets.encode(assets.rgb_image(60, 90, color=(i, 100, 200)), "PNG") for i in range(6)]
    ds = assets.write_parquet_dataset(tmp_path / "people", cells)
    out = tmp_path / "out"
    assert cli.main(_video_argv(clip_dir, ds, tiny_onnx, out, "-q", "--top-k", "3", "--use-segmentation")) == 0
    folder = out / "video_results" / "clip_1"
    res = [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]
    tracks = json.loads((folder / "tracks.json").read_text())
    tracks = tracks["tracks"] if isinstance(tracks, dict) else tracks
    matches = [m for r in res for p in r["persons"] for m in p["matches"]] + [m for t in tracks for m in t["matches"]]
    assert matches and {m["person"] for m in matches} == {0, 1}  # images 1, 4: one person; 2, 5: two
    # a person the segmenter did not find is matched by its box: counted, not passed over
    unmasked = sum(not p["masked"] for r in res for p in r["persons"])
    notes = read_section(out / "outputs", "video_clip_1")["summary"]["notes"]
    persons = sum(len(r["persons"]) for r in res)
    assert unmasked and f"{unmasked:,} of the {persons:,} persons had no mask (no person the segmenter found " in (
        " ".join(notes))  # (the stand-in segmenter's persons lie elsewhere than the stand-in detector's)
    names = {video.match_name(m) for m in matches}
    assert names == {f"people[{m['source_row']}]#p{m['person']}" for m in matches}
    manifest = list(csv.DictReader((out / "embeddings_segment" / "manifest.csv").open(newline="")))
    for m in matches:  # each match is its manifest line's crop: its person, photo and file, not another's
        line = manifest[m["row"]]
        assert (int(line["person"]), int(line["source_row"]), line["file"]) == (m["person"], m["source_row"], m["file"])
    twins = [(a, b) for r in res for p in r["persons"] for a, b in zip(p["matches"], p["matches"][1:])
             if a["file"] == b["file"]]
    assert twins and all(video.match_name(a) != video.match_name(b) for a, b in twins)
    assert cli.main(["--use-embedded-segment", "--query-text", "red", "--dataset", str(ds), "--onnx", str(tiny_onnx),
                     "--output-dir", str(out), "-q"]) == 0
    rows = read_section(out / "outputs", "query_segment")["data"]["rows"]
    row_name = [f"people[{r[5].rsplit('[', 1)[1]}" for r in rows]  # r: query, kind, rank, file, d, source, name
    assert rows and all(r[6] in (f"{n}#p0", f"{n}#p1") for r, n in zip(rows, row_name))
    same_file = [(a[6], b[6]) for a, b in zip(rows, rows[1:]) if a[3] == b[3]]
    assert same_file and all(x != y for x, y in same_file)
    browser.get((out / "outputs" / "report.html").as_uri())
    shown = wait(
        browser,
        "document.querySelectorAll('[data-role=frames] .person').length"
        " && document.querySelectorAll('#query_segment td').length"
        " && [[...document.querySelectorAll('[data-role=frames] .person')].map(s => s.textContent),"
        " [...document.querySelectorAll('#query_segment [data-role=query-results] tr:not(.query-row)')]"
        ".slice(1).map(r => r.cells[2].textContent)]",
    )
    firsts = {video.match_name(p["matches"][0]) for r in res for p in r["persons"]}
    assert {s.split(": ", 1)[1].rsplit(" d=", 1)[0] for s in shown[0]} == firsts
    # each person named by its track, as the frame picture's box label says it (video.box_label)
    labels = [video.box_label(p.get("track"), 0).split(" · ")[0] for r in res for p in r["persons"]]
    assert [s.split(": ", 1)[0] for s in shown[0]] == labels and any(x.startswith("#") for x in labels)
    assert shown[1] == [r[6] for r in rows]
    # the video section's failures box speaks of the gallery its matches come from
    heads = browser.execute_script("return [...document.querySelectorAll('#video_clip_1 .failures-box h3')]"
                                   ".map(h => h.textContent)")
    assert heads == ["Failed gallery items"]
    assert console_errors(browser) == []


def test_a_frame_picture_draws_each_person_as_the_annotated_video_does():
    """Its track's number and colour (the annotated video's), not the detection order in one red;
    a person without a track in grey."""
    from pipeline.annotate import track_colour
    from pipeline.video import draw_frame_picture

    frame = np.full((120, 160, 3), 255, np.uint8)
    people = persons([[10, 30, 60, 110], [90, 30, 150, 110]], [0.9, 0.5])
    pic = np.asarray(draw_frame_picture(frame, people, [], track_of={0: 2}))
    assert tuple(pic[80, 10]) == tuple(reversed(track_colour(2)))  # the left edge of person 0's box
    assert tuple(pic[80, 90]) == (120, 120, 120)  # person 1: no track


def test_a_box_label_names_the_track_or_says_there_is_no_crop():
    """A person's detection index means nothing to a reader: an untracked box says why it has no row."""
    from pipeline.video import box_label

    assert box_label(3, 0.914) == "#3 · 0.91"
    assert box_label(None, 0.5) == "no crop · 0.50"


def test_a_video_against_the_cached_gallery_asks_with_the_stores_own_model(clip_dir, tiny_clip, tmp_path, monkeypatch,
                                                                          capsys):
    """--use-embeddings with no --model, --onnx or --backend: the crops are embedded by the model that
    made the store (as the search modes take it), not the default hub model, which offline failed."""
    monkeypatch.setattr(video, "UltralyticsDetector", FakeDetector)
    data = assets.write_parquet_dataset(tmp_path / "ds", [assets.jpeg_bytes(60, 90, seed=700 + i) for i in range(8)])
    out = tmp_path / "out"
    model = ["--model", str(tiny_clip), "--backend", "torch"]
    assert cli.main(["--dataset", str(data), *model, "--output-dir", str(out), "--max-result-images", "0", "-q"]) == 0
    argv = ["--video_clip", "clip_1", "--video_dir", str(clip_dir), "--use-embeddings", "--output-dir", str(out),
            "--top-k", "3"]
    assert cli.main([*argv, *model, "-q"]) == 0
    results = out / "video_results" / "clip_1" / "results.jsonl"
    asked = results.read_text()
    results.unlink()
    capsys.readouterr()
    assert cli.main(argv) == 0
    assert results.read_text() == asked
    said = capsys.readouterr()
    assert "using the transformers model" not in said.out + said.err  # the run did not


def test_a_clip_named_with_a_hash_or_percent_gets_a_working_report(clip_dir, mixed_dataset, tiny_onnx, tmp_path,
                                                                    monkeypatch, browser):
    """'look #2 50%.mp4': its report section loads and its pictures and video are found (the section's
    file was asked for as a fragment, and the whole report failed to load)."""
    import shutil

    from tests.test_webreport import console_errors, wait

    monkeypatch.setattr(video, "UltralyticsDetector", FakeDetector)
    videos, out = tmp_path / "videos", tmp_path / "out"
    videos.mkdir()
    shutil.copy(clip_dir / "clip_1.mp4", videos / "look #2 50%.mp4")
    argv = ["--video_clip", "look #2 50%", "--video_dir", str(videos), "--dataset", str(mixed_dataset),
            "--onnx", str(tiny_onnx), "--output-dir", str(out), "-q"]
    assert cli.main(argv) == 3  # the mixed dataset's two bad rows
    browser.get((out / "outputs" / "report.html").as_uri())
    loaded = wait(browser, "document.querySelectorAll('[data-role=frames] img').length && "
                           "[...document.querySelectorAll('[data-role=frames] img, [data-role=video]')]"
                           ".map(e => { e.scrollIntoView(); return e.tagName === 'VIDEO' ? e.readyState > 0 "
                           ": e.complete && e.naturalWidth > 0; }).every(Boolean)")
    assert loaded
    assert "could not be loaded" not in browser.execute_script("return document.body.innerText")
    assert console_errors(browser) == []


def test_a_video_run_that_builds_its_store_anew_renews_the_index_an_earlier_gallery_run_left(
        clip_dir, tiny_onnx, tmp_path, monkeypatch, capsys):
    """A gallery run wrote index.faiss; the catalogue changed; the video run built the store again and
    then refused the index as another store's, on every rerun ("run the gallery again")."""
    monkeypatch.setattr(video, "UltralyticsDetector", FakeDetector)
    cells = [assets.jpeg_bytes(40, 56, seed=700 + i) for i in range(8)]
    data, out = assets.write_parquet_dataset(tmp_path / "shop", cells), tmp_path / "out"
    assert cli.main(["--dataset", str(data), "--onnx", str(tiny_onnx), "--output-dir", str(out), "-q",
                     "--index", "flat"]) == 0
    assert (out / "embeddings" / "index.faiss").is_file()
    assets.write_parquet_dataset(tmp_path / "shop", [*cells[1:], assets.jpeg_bytes(40, 56, seed=799)])
    assert cli.main(_video_argv(clip_dir, data, tiny_onnx, out, "-q")) == 0, capsys.readouterr().err
    from pipeline.index import read_info
    from pipeline.store import read_manifest, store_sha256

    assert read_info(out / "embeddings").store_sha256 == store_sha256(out / "embeddings")  # the new store's index
    files = {r.file for r in read_manifest(out / "embeddings" / "manifest.csv")}
    tracks = json.loads((out / "video_results" / "clip_1" / "tracks.json").read_text())["tracks"]
    assert tracks and all(m["file"] in files for t in tracks for m in t["matches"])  # matches of the store as it is


def test_a_clip_with_no_readable_frame_is_refused_before_its_earlier_outputs_go(clip_dir, mixed_dataset, tiny_onnx,
                                                                                   tmp_path, monkeypatch, capsys):
    """The README: a run checks the clip, and only then removes the last run's outputs for it. A clip
    replaced by one whose every packet is damaged was refused after they were gone; an audio-only file
    was told to re-encode to H.264."""
    import shutil

    import av

    monkeypatch.setattr(video, "UltralyticsDetector", FakeDetector)
    clips, out = tmp_path / "clips", tmp_path / "out"
    clips.mkdir()
    shutil.copy(next(clip_dir.glob("clip_1.*")), clips / "clip_1.avi")
    argv = ["--video_clip", "clip_1", "--video_dir", str(clips), "--dataset", str(mixed_dataset), "--onnx",
            str(tiny_onnx), "--output-dir", str(out), "-q"]
    assert cli.main(argv) == 3
    made = {p.name: p.read_bytes() for p in (out / "video_results" / "clip_1").iterdir()}
    broken = assets.write_video(tmp_path / "broken.avi", 5, (64, 48))
    for frame in range(5):
        _damaged(broken, frame)
    shutil.copy(broken, clips / "clip_1.avi")
    capsys.readouterr()
    assert cli.main(["--use-embeddings", *argv]) == 1
    assert "has no readable frames" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in (out / "video_results" / "clip_1").iterdir()} == made  # left as they were
    sound = tmp_path / "sound.mp4"
    with av.open(str(sound), "w") as container:
        stream = container.add_stream("aac", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 8000
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)
    with pytest.raises(PipelineError, match=r"has no video stream \(its streams: audio\); is it the clip you meant"):
        video.probe(sound)


def write_av_clip(path: Path, codec: str, frames: int, pix_fmt: str = "yuv420p", sample_aspect=None,
                  audio_seconds: float = 0.0, cover: bool = False) -> Path:
    """A 64x48 clip of `frames` grey frames at 30 fps written with PyAV (the container from the suffix),
    its pixels `sample_aspect` wide where given, with `audio_seconds` of silence beside it, and with
    `cover` a 32x32 cover picture before it: a first video stream of one JPEG frame."""
    import av

    with av.open(str(path), "w") as container:
        still = container.add_stream("mjpeg", rate=1) if cover else None
        stream = container.add_stream(codec, rate=30)
        stream.width, stream.height, stream.pix_fmt = 64, 48, pix_fmt
        if sample_aspect is not None:
            stream.codec_context.sample_aspect_ratio = sample_aspect
        sound = container.add_stream("aac", rate=8000) if audio_seconds else None
        if still is not None:  # every stream is added before the first packet writes the header
            still.width, still.height, still.pix_fmt = 32, 32, "yuvj420p"
            picture = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 200, np.uint8), format="rgb24")
            for packet in [*still.encode(picture.reformat(format="yuvj420p")), *still.encode(None)]:
                container.mux(packet)
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), (4 * i) % 256, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
        for k in range(int(audio_seconds * 8000 / 1024)) if sound is not None else ():
            chunk = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            chunk.sample_rate, chunk.pts = 8000, k * 1024
            for packet in sound.encode(chunk):
                container.mux(packet)
        for packet in sound.encode(None) if sound is not None else ():
            container.mux(packet)
    return path


def test_a_matroska_clip_cut_short_is_said_too(tmp_path):
    """Matroska and WebM keep no frame count: a file cut in half was read to its cut with nothing said.
    Its length at the frame rate is the count now (the progress bar's too)."""
    path = write_av_clip(tmp_path / "whole.mkv", "mjpeg", 60, pix_fmt="yuvj420p")
    assert video.probe(path)[:2] == (60, 30.0)
    cut = tmp_path / "cut.mkv"
    cut.write_bytes(path.read_bytes()[: int(path.stat().st_size * 0.5)])
    clip = video.Clip.from_file(cut, annotated_video=False)
    reader = FrameReader(cut, 10)
    list(reader)
    assert clip.frames_hint == 60 and reader.frames_read < 40
    said = video.short_read_note(clip, reader.frames_read, reader.seconds)
    assert said is not None and said.startswith(f"the clip ended after {reader.frames_read} of the 60 frames")


def test_a_clip_named_as_another_says_it_replaces_that_ones_results(clip_dir, mixed_dataset, tiny_onnx, tmp_path,
                                                                    monkeypatch, capsys):
    """Results are kept by the clip's name: clips/a.mp4 and clips/sub/a.mp4 share video_results/a/, and
    the second replaced the first's without a word. tracks.json names its file; the replacing run says so."""
    import shutil

    monkeypatch.setattr(video, "UltralyticsDetector", FakeDetector)
    clips, out = tmp_path / "clips", tmp_path / "out"
    (clips / "sub").mkdir(parents=True)
    source = next(clip_dir.glob("clip_1.*"))
    shutil.copy(source, clips / f"a{source.suffix}")
    shutil.copy(source, clips / "sub" / f"a{source.suffix}")
    common = ["--video_dir", str(clips), "--dataset", str(mixed_dataset), "--onnx", str(tiny_onnx), "--output-dir",
              str(out)]
    assert cli.main(["--video_clip", "a", *common, "-q"]) == 3
    tracks = json.loads((out / "video_results" / "a" / "tracks.json").read_text())
    assert tracks["source"] == str((clips / f"a{source.suffix}").resolve())
    capsys.readouterr()
    assert cli.main(["--video_clip", "sub/a", "--use-embeddings", *common]) == 3  # the gallery's bad rows
    said = " ".join(capsys.readouterr().out.split())
    assert f"held the results of another clip named alike, {(clips / f'a{source.suffix}').resolve()}: replaced" in said
    tracks = json.loads((out / "video_results" / "a" / "tracks.json").read_text())
    assert tracks["source"] == str((clips / "sub" / f"a{source.suffix}").resolve())  # the second clip's results now


def test_a_clip_of_non_square_pixels_is_read_as_it_is_shown(tmp_path):
    """HDV or DV footage codes its frames narrower than they are shown (pixels 4:3 wide): people and
    garments reached the detector and the matches squeezed, and the annotated video played 4:3."""
    from fractions import Fraction

    path = write_av_clip(tmp_path / "hdv.mp4", "mpeg4", 10, sample_aspect=Fraction(4, 3))
    assert video.probe(path) == (10, 30.0, 85, 48)  # 64 x 4/3 wide, as shown
    frames = [f for f in FrameReader(path, 5, small_size=(86, 48)) if f.analysed]
    assert [f.rgb.shape for f in frames] == [(48, 85, 3), (48, 85, 3)]
    assert video.Clip.from_file(path, annotated_video=True).small_size[0] > 48 * 16 / 9 - 2  # 16:9, not 4:3


def test_a_clip_whose_first_video_stream_is_its_cover_picture_is_read_by_its_moving_one(tmp_path):
    """A downloaded Matroska file may keep its cover picture as a first video stream of one frame:
    the run read that stream, one frame of 32x32 at 1 fps, and found nobody in a clip of 45 frames."""
    path = write_av_clip(tmp_path / "film.mkv", "mpeg4", 45, cover=True)
    import av

    with av.open(str(path)) as container:  # the file as a downloaded film has it: the cover first
        assert [(st.codec_context.name, st.width) for st in container.streams.video] == [("mjpeg", 32),
                                                                                           ("mpeg4", 64)]
    assert video.probe(path) == (45, 30.0, 64, 48)
    reader = FrameReader(path, 15)
    frames = [f for f in reader if f.analysed]
    assert reader.frames_read == 45 and reader.fps == 30.0
    assert [f.rgb.shape for f in frames] == [(48, 64, 3)] * 3
    assert [int(f.rgb[0, 0, 0]) for f in frames] == pytest.approx([0, 60, 120], abs=4)  # the clip's own greys


def test_a_matroska_clip_whose_sound_runs_longer_is_counted_by_its_video(tmp_path):
    """The container's length covers every stream: a clip whose sound runs on past its pictures was
    counted by the sound, and said to be cut short."""
    path = write_av_clip(tmp_path / "talk.mkv", "mjpeg", 30, pix_fmt="yuvj420p", audio_seconds=3.0)  # 1 s of pictures
    clip = video.Clip.from_file(path, annotated_video=False)
    reader = FrameReader(path, 10)
    list(reader)
    assert clip.frames_hint == 30 and reader.frames_read == 30
    assert video.short_read_note(clip, reader.frames_read, reader.seconds) is None


def test_a_det_model_that_is_not_there_is_said_before_the_gallery_is_embedded(clip_dir, mixed_dataset, tiny_onnx,
                                                                              tmp_path, monkeypatch, capsys):
    """A mistyped --det-model was found after the gallery was embedded (minutes on 10,000 rows)."""

    def no_gallery(*args, **kwargs):
        raise AssertionError("the gallery was opened before --det-model was checked")

    monkeypatch.setattr(video, "open_gallery", no_gallery)
    for model, said in ((tmp_path / "nope.pt", "not found locally"), (clip_dir, "is a folder, not YOLO weights")):
        assert cli.main(_video_argv(clip_dir, mixed_dataset, tiny_onnx, tmp_path / "o", "--det-model",
                                    str(model))) == 1
        assert f"YOLO model {str(model)!r} {said}" in capsys.readouterr().err


def test_a_crowd_is_drawn_in_part_and_listed_whole(clip_dir, mixed_dataset, tiny_onnx, tmp_path, monkeypatch):
    """300 persons at --top-k 100 made a frame picture 822 x 51,780 px: the picture draws the first
    persons and matches, says how many more, and results.jsonl still holds every person and match."""
    from PIL import Image

    monkeypatch.setattr(video, "UltralyticsDetector", FakeDetector)
    monkeypatch.setattr(video, "MAX_FRAME_ROWS", 1)  # two persons a frame: one drawn
    monkeypatch.setattr(video, "MAX_PICTURE_MATCHES", 2)
    out = tmp_path / "out"
    assert cli.main(_video_argv(clip_dir, mixed_dataset, tiny_onnx, out, "-q", "--top-k", "4")) == 3
    folder = out / "video_results" / "clip_1"
    lines = [json.loads(x) for x in (folder / "results.jsonl").read_text().splitlines()]
    assert all(len(r["persons"]) == 2 and all(len(p["matches"]) == 4 for p in r["persons"]) for r in lines)
    picture = Image.open(folder / f"frame_{lines[0]['frame']:06d}.jpg")
    one_row = video.compose_matches(np.zeros((128, 128, 3), np.uint8), "#1", [np.zeros((128, 128, 3), np.uint8)] * 2,
                                    ["d", "d"])
    import cv2

    capture = cv2.VideoCapture(str(next(clip_dir.glob("clip_1.*"))))
    clip_h = int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
    capture.release()
    # the frame, one person's row of two matches and the note: not two rows of four
    assert picture.height == clip_h + one_row.height + video.note_row("x").height
    pixels = np.asarray(picture.convert("L"))[-video.note_row("x").height:]
    assert (pixels < 160).any()  # the note's text: "+ 1 more person(s) with matches, not drawn here"


def test_a_clip_against_a_cache_never_built_is_refused_before_a_model_loads(clip_dir, tmp_path, monkeypatch, capsys):
    """--use-embeddings in an empty output folder: the refusal and the command that builds the gallery,
    at once, as a search's (it loaded the default model first, or failed offline on it)."""
    def no_model(*a, **kw):
        raise AssertionError("a model was loaded for a gallery that is not there")

    monkeypatch.setattr(video, "make_embedder", no_model)
    args = ["--video_clip", "clip_1", "--video_dir", str(clip_dir), "--output-dir", str(tmp_path / "o"),
            "--use-embeddings", "-q"]
    assert cli.main(args) == 1
    err = capsys.readouterr().err
    assert "no complete cache in" in err and "Build it first: run the same command without --use-embeddings" in err


def test_a_stop_while_a_clips_results_are_put_in_place_waits_for_the_moves(clip_dir, tiny_onnx, tmp_path,
                                                                          monkeypatch):
    """Ctrl-C (or SIGTERM) while the last results were unlinked and the new ones not yet all moved in
    left the clip's folder with neither (the new ones in .partial, which the next run deletes): the
    stop is taken once the results and their report section are in place."""
    import os
    import signal
    import time

    ds = assets.write_parquet_dataset(tmp_path / "ds", [assets.jpeg_bytes(40, 60, seed=i) for i in range(4)])
    monkeypatch.setattr(video, "UltralyticsDetector", FakeDetector)
    out = tmp_path / "out"
    assert cli.main(_video_argv(clip_dir, ds, tiny_onnx, out, "-q")) == 0
    folder = out / "video_results" / "clip_1"
    before = sorted(p.name for p in folder.iterdir())
    real_replace, real_publish, moved = os.replace, video.publish, []

    def replace(a, b):  # the third file's move: a Ctrl-C comes
        moved.append(b)
        if len(moved) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        real_replace(a, b)

    def publish(*args):
        with monkeypatch.context() as m:
            m.setattr(os, "replace", replace)
            return real_publish(*args)

    monkeypatch.setattr(video, "publish", publish)
    time.sleep(0.2)
    started = time.time() - 0.05  # the file system's clock may lag a tick
    assert cli.main(_video_argv(clip_dir, ds, tiny_onnx, out, "-q", "--use-embeddings")) == 130
    assert len(moved) > 3 and sorted(p.name for p in folder.iterdir()) == before  # every new file in place
    assert all(p.stat().st_mtime >= started for p in folder.iterdir()), "an earlier run's file left in place"
    from pipeline.webreport import read_section

    assert read_section(out / "outputs", "video_clip_1") is not None  # and the report names them
