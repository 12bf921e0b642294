"""Following people through a clip: the tracker on its own, then generated clips end to end (two
people crossing, one leaving and coming back), the annotated video, and the report."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

import main as cli
from pipeline import video
from pipeline.annotate import COLOURS_BGR
from pipeline.persons import Person
from pipeline.tracking import COVERED, MAX_APPEARANCE_DISTANCE, Tracker, covered_shares, motion_cost
from tests import assets

# ----------------------------------------------------------------------------- the tracker alone


def test_boxes_moved_out_of_the_frame_draw_inside_it_or_not_at_all():
    """After the last analysed frame a track's box moves on by its velocity and may leave the frame:
    its tile is kept inside the frame, and a box wholly outside is not drawn (it crashed the video's
    last frames)."""
    from pipeline.annotate import Drawing, draw

    tile = np.full((32, 32, 3), 200, np.uint8)
    frame = np.zeros((180, 320, 3), np.uint8)
    boxes = [[300, 20, 330, 100], [-40, 20, -10, 100], [330, 20, 360, 100], [-20, -30, 40, 60], [290, 150, 340, 230]]
    out = draw(frame.copy(), [Drawing(np.array(b, np.float32), i + 1, "x", tile) for i, b in enumerate(boxes)], 1.0)
    assert out.shape == frame.shape and out.any()
    alone = draw(frame.copy(), [Drawing(np.array([-40, 20, -10, 100], np.float32), 1, "x", tile)], 1.0)
    assert not alone.any()  # wholly outside: nothing drawn
    # Past the right edge: the tile goes left of the box, inside the frame (side 32 at 180 px: x 264..295)
    edge = draw(frame.copy(), [Drawing(np.array([300, 20, 330, 100], np.float32), 1, "x", tile)], 1.0)
    assert (edge[22:50, 266:294] == 200).all()




def unit(*v):
    x = np.asarray(v, np.float32)
    return x / np.linalg.norm(x)


RED, BLUE = unit(1, 0.1, 0), unit(0.1, 1, 0)  # cosine 0.2: two different garments


def box(cx, cy=50, w=40, h=80):
    return np.array([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], np.float32)


def feed(tracker, frame, people):
    """people: [(box, vector)] in detection order; returns the track id of each."""
    persons = [Person(b, 0.9) for b, _ in people]
    got = tracker.update(frame, frame / 30, persons, {k: v for k, (_, v) in enumerate(people)})
    return [got[k] for k in range(len(people))]


def test_people_who_meet_and_turn_back_keep_their_ids():
    # Red walks right and Blue left; they meet at x=100 and both turn back. Constant velocity says
    # they swapped sides; their looks say they did not.
    t = Tracker()
    xs = [(20, 180), (60, 140), (100, 110), (60, 150), (20, 190)]
    ids = [feed(t, 30 * i, [(box(r), RED), (box(b, cy=60), BLUE)]) for i, (r, b) in enumerate(xs)]
    assert ids == [[1, 2]] * 5
    assert len(t.tracks) == 2


def test_people_dressed_alike_are_told_apart_by_their_motion():
    t = Tracker()
    ids = []
    for i in range(6):  # straight lines crossing; detections in alternating order
        a, b = (box(20 + 40 * i, cy=40), RED), (box(220 - 40 * i, cy=70), RED)
        got = feed(t, 30 * i, [a, b] if i % 2 == 0 else [b, a])
        ids.append(got if i % 2 == 0 else got[::-1])
    assert ids == [[1, 2]] * 6


def test_a_covered_crop_showing_the_other_person_neither_swaps_nor_spoils_the_look():
    t = Tracker()
    feed(t, 0, [(box(40), RED), (box(160, cy=60), BLUE)])
    feed(t, 30, [(box(70), RED), (box(130, cy=60), BLUE)])
    # they overlap: the red person's crop is mostly the blue garment in front of it
    red_box, blue_box = box(100), box(100, cy=60)
    assert covered_shares([red_box, blue_box]).min() > COVERED
    spoiled = unit(0.15, 1, 0)  # over the appearance gate from red: only the cover lets it join
    assert 1 - float(spoiled @ RED) > MAX_APPEARANCE_DISTANCE
    assert feed(t, 60, [(blue_box, BLUE), (red_box, spoiled)]) == [2, 1]
    assert np.allclose(t.tracks[0].look, RED, atol=1e-6)  # the spoiled vector is not in the look
    assert t.tracks[0].sightings[-1].covered > COVERED
    assert feed(t, 90, [(box(130), RED), (box(70, cy=60), BLUE)]) == [1, 2]


def test_a_covered_crop_unlike_every_track_and_far_from_all_is_a_new_person():
    """A covered crop may join a track it does not look like only near where that track was going:
    two people who walk in together, each half covering the other, far from where the one who
    left was, are two new tracks, not one of them joined to the leaver (whose catalogue matches
    it would then be labelled with)."""
    checks = unit(0, 0, 1)
    t = Tracker()
    assert feed(t, 0, [(box(40), RED)]) == [1]
    pair = [(box(260), BLUE), (box(284), checks)]
    assert covered_shares([b for b, _ in pair]).min() > COVERED
    assert feed(t, 30, pair) == [2, 3]
    assert feed(t, 60, [(box(250), BLUE), (box(274), checks)]) == [2, 3]
    assert np.allclose(t.tracks[0].look, RED, atol=1e-6) and len(t.tracks[0].sightings) == 1


def test_a_different_look_in_the_same_place_is_a_new_person():
    t = Tracker()
    assert feed(t, 0, [(box(50), RED)]) == [1]
    assert feed(t, 30, [(box(50), unit(0, 0, 1))]) == [2]  # cosine 0 with red: over the gate
    assert feed(t, 60, [(box(52), RED)]) == [1]  # the first one was still there


@pytest.mark.parametrize("absent, same", [(2, True), (3, False)])
def test_a_track_waits_max_gap_analysed_frames(absent, same):
    t = Tracker(max_gap=2)
    feed(t, 0, [(box(50), RED)])
    for i in range(absent):
        feed(t, 30 * (i + 1), [])
    assert feed(t, 30 * (absent + 1), [(box(50), RED)]) == [1 if same else 2]


def test_look_is_the_mean_and_boxes_are_interpolated():
    t = Tracker()
    v1, v2 = unit(1, 0.2, 0), unit(1, -0.2, 0)
    feed(t, 0, [(box(50), v1)])
    feed(t, 30, [(box(80), v2)])
    track = t.tracks[0]
    assert np.allclose(track.look, unit(1, 0, 0), atol=1e-6)
    assert np.allclose(track.box_at(10), box(60)) and np.allclose(track.box_at(30), box(80))
    assert track.box_at(31) is None and track.box_at(-1) is None
    assert np.allclose(track.predicted_box(60), box(110))
    # Seen again after an absence (not in the analysed frames 60 and 90): no box across it, where
    # nobody was, only between two analysed frames that both saw the person
    feed(t, 60, [])
    feed(t, 90, [])
    feed(t, 120, [(box(90), v1)])
    assert track.box_at(60, max_span=30) is None and track.box_at(119, max_span=30) is None
    assert np.allclose(track.box_at(20, max_span=30), box(70)) and np.allclose(track.box_at(120, 30), box(90))
    assert track.box_at(60) is not None  # without a span: interpolated across, as before


def test_covered_shares():
    got = covered_shares([[0, 0, 10, 10], [5, 0, 15, 10], [0, 0, 20, 20], [30, 30, 30, 40]])
    assert np.allclose(got, [1.0, 1.0, 0.25, 0.0])  # the small boxes lie inside the big one; one other at most
    assert covered_shares([[0, 0, 4, 4]]).tolist() == [0.0]


def test_motion_cost_keeps_telling_near_from_far_without_overlap():
    got = motion_cost([box(50)], [box(50), box(60), box(90), box(210), box(50, cy=250)])[0]
    assert got[0] == 0.0 and got[0] < got[1] < got[2] < got[3] == got[4] == 1.0
    assert got[2] == pytest.approx(0.5 + 0.5 * 40 / 160)  # no overlap left: the distance still counts


# ----------------------------------------------------------------------------- generated clips

W, H, FPS = 320, 180, 30.0
RED_ROW, RINGS_ROW, CHECKS_ROW = 3, 6, 7  # where the garments sit in the catalogue


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory):
    """Ten rows: the three garments at rows 3, 6 and 7 among random pictures."""
    cells = [assets.jpeg_bytes(100 + 5 * i, 140, seed=40 + i) for i in range(10)]
    for row, kind in ((RED_ROW, 0), (RINGS_ROW, 1), (CHECKS_ROW, 2)):
        cells[row] = assets.encode(Image.fromarray(assets.garment(kind, 120, 240)), "JPEG", quality=92)
    return assets.write_parquet_dataset(tmp_path_factory.mktemp("catalogue") / "garments", cells)


def crossing(i):
    """Red walks right along the top, the rings walk left lower down; they cross at frame 150, where
    the rings, drawn in front, cover two thirds of the red box."""
    t = i / FPS
    return [(0, box(40 + 24 * t, cy=78, w=48, h=96)), (1, box(280 - 24 * t, cy=108, w=48, h=96))]


def leaving(i):
    """The checks walk right, are gone from 3 s to 7 s, and walk back in from the right."""
    t = i / FPS
    if t < 3:
        return [(2, box(40 + 40 * t, cy=90, w=48, h=96))]
    if t < 7:
        return []
    return [(2, box(280 - 30 * (t - 7), cy=90, w=48, h=96))]


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("walks")
    for name, scene in (("crossing", crossing), ("leaving", leaving)):
        assets.write_walking_clip(d / f"{name}.mp4", scene, 300, (W, H), FPS)
    return d


class ScriptedDetector:
    """Finds the scene's true boxes (each jittered by up to 1.5 px) in a shuffled order; call n is
    frame n x stride."""

    def __init__(self, scene, stride=30):
        self.scene, self.stride, self.calls = scene, stride, 0
        self.rng = np.random.default_rng(5)

    def detect(self, frames):
        out = []
        for _ in frames:
            found = [
                Person(b + self.rng.uniform(-1.5, 1.5, 4).astype(np.float32), 0.9 - 0.01 * k)
                for k, (_, b) in enumerate(self.scene(self.calls * self.stride))
            ]
            self.calls += 1
            out.append([found[k] for k in self.rng.permutation(len(found))])
        return out


def run_clip(clip, scene, clips, catalogue, tiny_onnx, out, monkeypatch, *extra):
    monkeypatch.setattr(video, "UltralyticsDetector", lambda *a, **k: ScriptedDetector(scene))
    argv = ["--video_clip", clip, "--video_dir", str(clips), "--dataset", str(catalogue), "--onnx", str(tiny_onnx)]
    assert cli.main([*argv, "--output-dir", str(out), "-q", "--top-k", "3", *extra]) == 0
    return json.loads((out / "video_results" / clip / "tracks.json").read_text())


def true_kind(scene, frame, box_xyxy):
    """The garment whose true box overlaps the sighting's box most."""
    from pipeline.persons import box_iou

    walkers = scene(frame)
    iou = box_iou(np.array([box_xyxy]), np.stack([b for _, b in walkers]))[0]
    return walkers[int(iou.argmax())][0]


@pytest.fixture(scope="module")
def crossed(clips, catalogue, tiny_onnx, tmp_path_factory):
    mp = pytest.MonkeyPatch()
    out = tmp_path_factory.mktemp("crossed")
    try:
        return out, run_clip("crossing", crossing, clips, catalogue, tiny_onnx, out, mp)
    finally:
        mp.undo()


def test_two_people_crossing_are_two_tracks_without_a_swap(crossed):
    out, tracks = crossed
    assert tracks["frames"] == 300 and tracks["stride"] == 30 and tracks["fps"] == pytest.approx(FPS)
    assert len(tracks["tracks"]) == 2
    rows = {0: RED_ROW, 1: RINGS_ROW}
    kinds = set()
    for track in tracks["tracks"]:
        assert [s["frame"] for s in track["sightings"]] == list(range(0, 300, 30))
        assert (track["frames"], track["first_s"], track["last_s"]) == (10, 0.0, 9.0)
        (kind,) = {true_kind(crossing, s["frame"], s["box_xyxy"]) for s in track["sightings"]}  # one person
        kinds.add(kind)
        assert track["matches"][0]["row"] == rows[kind]  # its look's top-1 is its garment
        assert [m["rank"] for m in track["matches"]] == [1, 2, 3]
        assert (out / "video_results" / "crossing" / track["sheet"]).is_file()
    assert kinds == {0, 1}
    # results.jsonl names the same track for each person as tracks.json
    by_frame = {(s["frame"], tuple(s["box_xyxy"])): t["id"] for t in tracks["tracks"] for s in t["sightings"]}
    lines = (out / "video_results" / "crossing" / "results.jsonl").read_text().splitlines()
    for r in map(json.loads, lines):
        assert len(r["persons"]) == 2
        for p in r["persons"]:
            assert p["track"] == by_frame[(r["frame"], tuple(p["box_xyxy"]))]


def test_contact_sheet_shows_the_crops_and_the_matches(crossed):
    out, tracks = crossed
    sheet = Image.open(out / "video_results" / "crossing" / "track_001.jpg")
    assert sheet.width >= 8 * 128 and sheet.height > 2 * 128  # eight crops over time, then the matches


def test_annotated_video_is_h264_with_every_frame_and_the_boxes(crossed):
    import av

    out, tracks = crossed
    path = out / "video_results" / "crossing" / "annotated.mp4"
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264" and (stream.width, stream.height) == (W, H)
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        duration = float(container.duration / av.time_base)
    assert len(frames) == 300 and duration == pytest.approx(10.0, abs=0.05)
    # frame 15 is not analysed: red's box is drawn between where it was at frames 0 and 30
    red = next(t for t in tracks["tracks"] if true_kind(crossing, 0, t["sightings"][0]["box_xyxy"]) == 0)
    x1, y1, x2, y2 = (np.array(red["sightings"][0]["box_xyxy"]) + np.array(red["sightings"][1]["box_xyxy"])) / 2
    expected = np.array(COLOURS_BGR[red["id"] - 1][::-1])
    x = int(round(x1))
    columns = [np.median(frames[15][int(y1) + 20 : int(y2) - 20, c], axis=0) for c in range(x - 2, x + 3)]
    assert min(np.abs(c - expected).max() for c in columns) < 30  # the track's colour, not the floor
    floor = frames[15][5:15, 5:15].reshape(-1, 3).mean(axis=0)
    assert np.abs(floor - 128).max() < 12  # away from the people the clip is unchanged


def test_annotated_video_plays_in_chromium_and_the_report_shows_the_tracks(crossed, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    out, tracks = crossed
    page = out / "outputs" / "report.html"
    browser.get(page.as_uri() + "#video_crossing")
    video_el = WebDriverWait(browser, 20).until(lambda d: d.find_element(By.CSS_SELECTOR, "video[data-role=video]"))
    WebDriverWait(browser, 20).until(lambda d: d.execute_script("return arguments[0].readyState >= 1", video_el))
    assert browser.execute_script("return arguments[0].duration", video_el) == pytest.approx(10.0, abs=0.05)
    assert browser.execute_script("return [arguments[0].videoWidth, arguments[0].videoHeight]", video_el) == [W, H]
    assert browser.execute_script("return arguments[0].error", video_el) is None
    text = browser.find_element(By.TAG_NAME, "body").text
    assert "People followed through the clip (2)" in text
    assert "Track 1: seen 0.0–9.0 s in 10 analysed frames" in text
    sheets = browser.find_elements(By.CSS_SELECTOR, "img[alt^='track ']")
    assert len(sheets) == 2
    browser.execute_script("arguments[0].scrollIntoView()", sheets[1])
    WebDriverWait(browser, 10).until(
        lambda d: all(d.execute_script("return arguments[0].naturalWidth", s) for s in sheets)
    )


def test_someone_who_leaves_and_comes_back_is_a_new_track_unless_track_gap_allows(
    clips, catalogue, tiny_onnx, tmp_path, monkeypatch
):
    tracks = run_clip("leaving", leaving, clips, catalogue, tiny_onnx, tmp_path / "a", monkeypatch)["tracks"]
    # gone from 3 s to 7 s: four analysed frames, more than the default --track-gap 2
    assert [(t["first_s"], t["last_s"]) for t in tracks] == [(0.0, 2.0), (7.0, 9.0)]
    assert all(t["matches"][0]["row"] == CHECKS_ROW for t in tracks)
    again = run_clip("leaving", leaving, clips, catalogue, tiny_onnx, tmp_path / "b", monkeypatch, "--track-gap", "4")
    assert [(t["id"], t["first_s"], t["last_s"], t["frames"]) for t in again["tracks"]] == [(1, 0.0, 9.0, 6)]
    # One track across the absence, but no box drawn where nobody is: while the checks are gone
    # (3 to 7 s) the annotated frames are the plain grey floor; once back, their box is drawn.
    import av

    with av.open(str(tmp_path / "b" / "video_results" / "leaving" / "annotated.mp4")) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(container.streams.video[0])]
    drawn = {i: int((np.abs(frames[i].astype(int) - 128).max(axis=2) > 40).sum()) for i in (100, 150, 195, 205, 215)}
    assert drawn[100] == drawn[150] == drawn[195] == drawn[205] == 0 and drawn[215] > 1000, drawn


def test_no_annotated_video_skips_it_and_leaves_none_of_an_earlier_run(clips, catalogue, tiny_onnx, tmp_path,
                                                                        monkeypatch):
    out = tmp_path / "o"
    run_clip("leaving", leaving, clips, catalogue, tiny_onnx, out, monkeypatch)
    assert list((out / "video_results" / "leaving").glob("annotated.*"))
    tracks = run_clip("leaving", leaving, clips, catalogue, tiny_onnx, out, monkeypatch, "--no-annotated-video")
    assert len(tracks["tracks"]) == 2
    assert not list((out / "video_results" / "leaving").glob("annotated.*"))  # the first run's went too
