"""Person crops: exact pixels, manifest links, the segmented run and its cache."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

import main as cli
from pipeline import galleries, yolo
from pipeline.persons import CappedPersons, Person, Segmenter, box_pixels, white_background_crop
from pipeline.store import read_manifest
from tests import assets


def test_crop_keeps_inside_whitens_outside():
    img = np.arange(10 * 12 * 3, dtype=np.uint8).reshape(10, 12, 3)
    mask = np.zeros((10, 12), bool)
    mask[2:6, 3:7] = True
    mask[4, 8] = True  # an odd shape: a detached pixel inside the box
    crop = white_background_crop(img, mask, np.array([3, 2, 9, 7], np.float32))
    assert crop.shape == (5, 6, 3)
    sub_img, sub_mask = img[2:7, 3:9], mask[2:7, 3:9]
    assert np.array_equal(crop[sub_mask], sub_img[sub_mask])
    assert (crop[~sub_mask] == 255).all()
    assert (crop[2, 5] == img[4, 8]).all()


def test_crop_box_fractional_and_past_the_border():
    img = np.zeros((8, 8, 3), np.uint8)
    mask = np.ones((8, 8), bool)
    assert box_pixels(np.array([1.2, 0.5, 4.1, 3.0]), 8, 8) == (1, 0, 5, 3)
    crop = white_background_crop(img, mask, np.array([-5, -3, 20, 4.5], np.float32))
    assert crop.shape == (5, 8, 3) and (crop == 0).all()  # clipped to the image, mask touches the border
    assert white_background_crop(img, mask, np.array([9, 9, 12, 12], np.float32)) is None


def test_crop_refuses_mismatched_mask():
    with pytest.raises(ValueError, match=r"mask shape \(4, 4\) does not match image shape \(8, 8\)"):
        white_background_crop(np.zeros((8, 8, 3), np.uint8), np.ones((4, 4), bool), np.array([0, 0, 2, 2]))


class FakeSegmenter(Segmenter):
    """Known persons: image i gets i % 3 persons, left/right/centre stripes of the image."""

    calls: list[int] = []

    def segment(self, images_rgb):
        FakeSegmenter.calls.append(len(images_rgb))
        out = []
        for im in images_rgb:
            h, w = im.shape[:2]
            key = int(im[0, 0, 0]) % 3  # the colour carries the row number
            persons = []
            for p in range(key):
                mask = np.zeros((h, w), bool)
                x0 = p * w // 2
                mask[h // 4 : 3 * h // 4, x0 : x0 + w // 3] = True
                persons.append(Person(np.array([x0, h // 4, x0 + w // 3, 3 * h // 4], np.float32), 0.9 - 0.1 * p, mask))
            out.append(persons)
        return out


@pytest.fixture()
def fake_segmenter(monkeypatch):
    monkeypatch.setattr(galleries, "make_segmenter", lambda spec, device: FakeSegmenter())
    FakeSegmenter.calls = []


@pytest.fixture(scope="module")
def people_dataset(tmp_path_factory):
    cells = [assets.encode(assets.rgb_image(60, 90, color=(i, 100, 200)), "PNG") for i in range(9)]
    cells[4] = assets.corrupt_bytes()
    return assets.write_parquet_dataset(tmp_path_factory.mktemp("people") / "ds", cells)


def test_segmented_run_with_known_masks(fake_segmenter, people_dataset, tiny_onnx, tmp_path):
    out = tmp_path / "out"
    code = cli.main(
        [
            "--use-segmentation", "--dataset", str(people_dataset), "--onnx", str(tiny_onnx), "--output-dir", str(out),
            "-q", "--top-k", "2",
        ]
    )
    assert code == 3  # one corrupt row
    rows = read_manifest(out / "embeddings_segment" / "manifest.csv")
    crops = [r for r in rows if r.status == "ok"]
    expected = sum(i % 3 for i in range(9) if i != 4)
    assert len(crops) == expected > 8 - 1  # more crops than usable images
    assert {r.source_row for r in rows} == set(range(9))
    no_person = [r.source_row for r in rows if r.status == "no_person"]
    assert no_person == [0, 3, 6]
    assert {(r.width, r.height) for r in rows if r.status == "no_person"} == {(60, 90)}  # the row's picture
    emb = np.load(out / "embeddings_segment" / "embeddings.npy")
    assert emb.shape == (expected, 16)
    for r in crops:
        assert r.file == f"seg_{r.sha256[:16]}.png"
        assert (r.box_x1, r.box_y1, r.box_x2, r.box_y2) == (r.person * 30, 22, r.person * 30 + 20, 67)
        assert r.mask_area == 45 * 20 and r.confidence == pytest.approx(0.9 - 0.1 * r.person)
        from PIL import Image

        arr = np.asarray(Image.open(out / "images_segment" / r.file))
        assert arr.shape == (45, 20, 3) and (arr[0, 0] == (r.source_row, 100, 200)).all()
    assert FakeSegmenter.calls and max(FakeSegmenter.calls) > 1  # batched
    # crops of equal pixels (these pictures' persons are alike) are one file, and one picture
    pictures = {p.name for p in (out / "retrieval_results" / "segment").glob("*_matches.jpg")}
    assert pictures == {r.file.replace(".png", "_matches.jpg") for r in crops} and len(pictures) < expected
    assert (out / "outputs" / "distance_matrix_segment.npy").is_file()
    assert not (out / "embeddings").exists()

    # --use-embedded-segment reuses it, and refuses it after tampering
    assert cli.main(["--use-embedded-segment", "--onnx", str(tiny_onnx), "--output-dir", str(out), "-q"]) == 3
    (out / "images_segment" / crops[0].file).write_bytes(b"changed")
    assert cli.main(["--use-embedded-segment", "--onnx", str(tiny_onnx), "--output-dir", str(out), "-q"]) == 1


def test_keep_unsegmented_keeps_whole_images(fake_segmenter, people_dataset, tiny_onnx, tmp_path, capsys):
    out = tmp_path / "out"
    cli.main(
        [
            "--use-segmentation", "--keep-unsegmented", "--dataset", str(people_dataset), "--onnx", str(tiny_onnx),
            "--output-dir", str(out),
        ]
    )
    rows = read_manifest(out / "embeddings_segment" / "manifest.csv")
    kept = [r for r in rows if r.file and r.person == -1]
    assert [r.source_row for r in kept] == [0, 3, 6] and all(r.status == "ok" and r.person == -1 for r in kept)
    # the summary counts them: rows without a person, kept whole (it said "rows without person 0")
    counts = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("counts:"))
    assert "rows without person 3, kept whole 3," in counts


def test_segmented_run_with_yolo_from_yaml(people_dataset, tiny_onnx, tmp_path):
    out = tmp_path / "out"
    code = cli.main(
        [
            "--use-segmentation", "--seg-model", "yolov8n-seg.yaml", "--seg-imgsz", "160", "--dataset",
            str(people_dataset), "--onnx", str(tiny_onnx), "--output-dir", str(out), "-q", "--limit", "4",
        ]
    )
    assert code == 0
    rows = read_manifest(out / "embeddings_segment" / "manifest.csv")
    assert {r.source_row for r in rows} == {0, 1, 2, 3}
    assert all(r.status in ("ok", "no_person") for r in rows)


def test_segmentation_flags_need_segmentation(capsys):
    assert cli.main(["--seg-conf", "0.5"]) == 2
    assert "needs --use-segmentation" in capsys.readouterr().err
    assert cli.main(["--use-segmentation", "--seg-conf", "1.5"]) == 2
    capsys.readouterr()
    assert cli.main(["--seg-backend", "torch"]) == 2
    assert "--seg-backend needs --use-segmentation" in capsys.readouterr().err
    assert cli.main(["--use-segmentation", "--seg-backend", "tensorrt"]) == 2
    assert "invalid choice: 'tensorrt'" in capsys.readouterr().err
    assert cli.main(["--max-persons", "3"]) == 2
    assert "--max-persons needs --use-segmentation" in capsys.readouterr().err
    assert cli.main(["--use-segmentation", "--max-persons", "0"]) == 2
    assert "--max-persons: must be >= 1, got 0" in capsys.readouterr().err


def test_segmented_query_uses_each_person(fake_segmenter, people_dataset, tiny_onnx, tmp_path):
    out = tmp_path / "out"
    cli.main(
        [
            "--use-segmentation", "--dataset", str(people_dataset), "--onnx", str(tiny_onnx), "--output-dir", str(out),
            "-q",
        ]
    )
    q = tmp_path / "q.png"
    q.write_bytes(assets.encode(assets.rgb_image(60, 90, color=(5, 100, 200)), "PNG"))  # 5 % 3 = 2 persons
    assert (
        cli.main(
            [
                "--query-image", str(q), "--use-segmentation", "--onnx", str(tiny_onnx), "--output-dir", str(out), "-q",
                "--top-k", "2",
            ]
        )
        == 0
    )
    import csv

    with open(out / "retrieval_results" / "segment" / "queries" / "query_results.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted({r["query"] for r in rows}) == ["q.png#p0", "q.png#p1"]
    # person 0 of the query is the same crop as person 0 of gallery row 5
    top = [r for r in rows if r["query"] == "q.png#p0"][0]
    lines = read_manifest(out / "embeddings_segment" / "manifest.csv")
    crop = [r.file for r in lines if r.source_row == 5 and r.person == 0]
    assert [top["gallery_file"]] == crop and float(top["distance"]) < 1e-5


def test_a_search_of_a_folder_of_a_segmented_gallery_alone_without_the_flag_says_the_flag(
        fake_segmenter, people_dataset, tiny_onnx, tmp_path, capsys):
    """--use-segmentation forgotten: "Build it first with a gallery run", which embeds everything again."""
    out = tmp_path / "out"
    assert cli.main(["--use-segmentation", "--dataset", str(people_dataset), "--onnx", str(tiny_onnx),
                     "--output-dir", str(out), "-q"]) == 3
    capsys.readouterr()
    assert cli.main(["--query-text", "red dress", "--onnx", str(tiny_onnx), "--output-dir", str(out), "-q"]) == 1
    said = " ".join(capsys.readouterr().err.split())
    assert f"{out} holds a segmented gallery (person crops) in {out / 'embeddings_segment'}: to search that one, " \
           "run the same command with --use-segmentation" in said and "Build it first" not in said
    # the same with a cache flag: the other one, not "Build it first", which would build the whole-photo gallery
    assert cli.main(["--use-embeddings", "--onnx", str(tiny_onnx), "--output-dir", str(out), "-q"]) == 1
    said = " ".join(capsys.readouterr().err.split())
    assert f"{out} holds a segmented gallery (person crops) in {out / 'embeddings_segment'}: to reuse that one, run " \
           "the same command with --use-embedded-segment in place of --use-embeddings; to build this one, run the " \
           "same command without --use-embeddings" in said


# ----------------------------------------------------------------------------- ONNX segmentation backend
@pytest.fixture(scope="module")
def person_pt(tmp_path_factory):
    """.pt weights of a yolov8n-seg that finds up to 4 "persons" per picture (tests.assets.person_yolo)."""
    pt = tmp_path_factory.mktemp("yolo") / "person-seg.pt"
    assets.person_yolo("yolov8n-seg.yaml").save(pt)
    return pt


def _pictures(n: int = 4) -> list[np.ndarray]:
    from PIL import Image

    return [np.asarray(assets.rgb_image(12, 16, seed=50 + i).resize((120, 160), Image.BICUBIC)) for i in range(n)]


def test_onnx_backend_exports_once_and_finds_the_same_persons(person_pt, monkeypatch):
    from pipeline import yolo as segment
    from pipeline.yolo import SegmentSpec

    # max_persons 3: Ultralytics is asked for the 4 most confident, as many as this test always compared
    spec = SegmentSpec(model=str(person_pt), imgsz=160, max_persons=3)
    onnx_seg = segment.UltralyticsSegmenter(spec, device="cpu")
    assert onnx_seg.backend == "onnx"
    exported = segment.yolo_onnx_path(person_pt)
    # only the verified export is left beside the weights: no temp folder, no <stem>.onnx of Ultralytics'
    assert sorted(p.name for p in person_pt.parent.iterdir()) == sorted([person_pt.name, exported.name])
    torch_seg = segment.UltralyticsSegmenter(
        SegmentSpec(model=str(person_pt), imgsz=160, backend="torch", max_persons=3), device="cpu"
    )
    assert torch_seg.backend == "torch"
    pictures = _pictures()
    a, b = torch_seg.segment(pictures), onnx_seg.segment(pictures)
    assert [len(x) for x in a] == [len(x) for x in b] and sum(map(len, a)) >= 3
    for pa, pb in zip(a, b):
        for p, q in zip(pa, pb):
            assert np.abs(p.box_xyxy - q.box_xyxy).max() < 0.05
            assert 0 < p.area < p.mask.size  # a real mask, not empty or the whole picture
            assert np.logical_and(p.mask, q.mask).sum() / np.logical_or(p.mask, q.mask).sum() >= 0.99
    # the next run loads the export without exporting again
    monkeypatch.setattr(segment, "export_yolo_onnx", lambda *a, **k: pytest.fail("exported a second time"))
    assert segment.UltralyticsSegmenter(spec, device="cpu").backend == "onnx"


def test_export_that_fails_verification_is_not_kept(person_pt, tmp_path, monkeypatch, caplog):
    import shutil

    from pipeline import yolo as segment
    from pipeline.errors import PipelineError
    from pipeline.yolo import SegmentSpec

    pt = tmp_path / person_pt.name
    shutil.copyfile(person_pt, pt)
    monkeypatch.setattr(segment, "YOLO_ONNX_TOLERANCE", 0.0)  # any difference at all now fails
    with pytest.raises(PipelineError, match="differs from the torch model"):
        segment.load_cpu_yolo(*_args(SegmentSpec(model=str(pt), imgsz=160, backend="onnx")), "cpu")
    assert [p.name for p in tmp_path.iterdir()] == [pt.name]
    with caplog.at_level("WARNING"):
        _, backend = segment.load_cpu_yolo(*_args(SegmentSpec(model=str(pt), imgsz=160)), "cpu")
    assert backend == "torch" and "running segment with torch" in caplog.text
    assert [p.name for p in tmp_path.iterdir()] == [pt.name]


def test_weights_in_a_read_only_folder_export_to_the_user_cache(person_pt, tmp_path, monkeypatch):
    import shutil

    from pipeline import yolo as segment
    from pipeline.yolo import SegmentSpec

    shared = tmp_path / "shared"
    shared.mkdir()
    pt = shared / person_pt.name
    shutil.copyfile(person_pt, pt)
    # The tests run as root, for whom chmod does not stop a write; the folder check is what decides.
    real = segment._writable
    monkeypatch.setattr(segment, "_writable", lambda folder: folder != shared and real(folder))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    spec = SegmentSpec(model=str(pt), imgsz=160)
    _, backend = segment.load_cpu_yolo(*_args(spec), "cpu")
    cached = tmp_path / "cache" / "fashion-visual-search" / "yolo" / segment.yolo_onnx_path(pt).name
    assert backend == "onnx" and segment.yolo_onnx_path(pt) == cached and cached.is_file()
    assert [p.name for p in shared.iterdir()] == [pt.name]  # nothing written beside the weights
    assert [p.name for p in cached.parent.iterdir()] == [cached.name]  # no export temp folder left
    monkeypatch.setattr(segment, "export_yolo_onnx", lambda *a, **k: pytest.fail("exported a second time"))
    assert segment.load_cpu_yolo(*_args(spec), "cpu")[1] == "onnx"


@pytest.mark.parametrize(
    "model, backend, device, message",
    [
        ("x.onnx", "torch", "cpu", "is an ONNX file"),
        ("x.pt", "tensorrt", "cpu", "unknown --seg-backend"),
        ("yolov8n-seg.yaml", "onnx", "cpu", "is not a .pt file"),
        ("x.pt", "onnx", "cuda", "runs on the CPU"),
    ],
)
def test_backend_choices_that_cannot_work_are_refused(model, backend, device, message):
    from pipeline.errors import PipelineError
    from pipeline.yolo import SegmentSpec

    with pytest.raises(PipelineError, match=message):
        yolo.load_cpu_yolo(*_args(SegmentSpec(model=model, backend=backend)), device)


class EmptyMaskSecond(Segmenter):
    """Two persons per picture; the second has a box but an empty mask."""

    def segment(self, images_rgb):
        out = []
        for im in images_rgb:
            h, w = im.shape[:2]
            full = np.zeros((h, w), bool)
            full[: h // 2] = True
            out.append(
                [
                    Person(np.array([0, 0, w, h // 2], np.float32), 0.9, full),
                    Person(np.array([0, h // 2, w, h], np.float32), 0.8, np.zeros((h, w), bool)),
                ]
            )
        return out


def test_person_with_empty_mask_is_recorded_not_embedded_as_white(people_dataset, tiny_onnx, tmp_path, monkeypatch):
    monkeypatch.setattr(galleries, "make_segmenter", lambda spec, device: EmptyMaskSecond())
    out = tmp_path / "out"
    assert (
        cli.main(
            [
                "--use-segmentation", "--dataset", str(people_dataset), "--onnx", str(tiny_onnx), "--output-dir",
                str(out), "-q", "--max-result-images", "0",
            ]
        )
        == 3
    )
    rows = [r for r in read_manifest(out / "embeddings_segment" / "manifest.csv") if r.person == 1]
    assert len(rows) == 8  # every readable row
    for r in rows:
        assert r.status == "failed" and r.error == "empty person mask or box" and r.embedding_row == -1 and r.file == ""
        assert r.mask_area == 0
    named = {r.file for r in read_manifest(out / "embeddings_segment" / "manifest.csv") if r.file}
    assert {p.name for p in (out / "images_segment").iterdir()} == named  # no file for the failed persons
    assert np.load(out / "embeddings_segment" / "embeddings.npy").shape[0] == 8  # person 0 of each row only


def _args(spec):
    """load_cpu_yolo's arguments for a segmentation spec."""
    return spec.model, "segment", spec.backend, spec.imgsz


# ----------------------------------------------------------------------------- --max-persons
class Crowd(Segmenter):
    """Image i holds 3 * (i % 3) persons in a row of narrow stripes, with confidences out of order."""

    def segment(self, images_rgb):
        out = []
        for im in images_rgb:
            h, w = im.shape[:2]
            persons = []
            for p in range(3 * (int(im[0, 0, 0]) % 3)):
                mask = np.zeros((h, w), bool)
                mask[10:80, 2 * p : 2 * p + 2] = True
                confidence = 0.5 + 0.05 * ((p * 7) % 6)  # 0.5 .. 0.75, not sorted
                persons.append(Person(np.array([2 * p, 10, 2 * p + 2, 80], np.float32), confidence, mask))
            out.append(persons)
        return out


def crowd_run(segmenter: Segmenter, people_dataset, tiny_onnx, tmp_path, monkeypatch, *more: str) -> list:
    """A segmented gallery of people_dataset cut by `segmenter` with --max-persons 4: its manifest's lines."""
    monkeypatch.setattr(galleries, "make_segmenter", lambda spec, device: segmenter)
    out = tmp_path / "out"
    argv = ["--use-segmentation", "--dataset", str(people_dataset), "--onnx", str(tiny_onnx), "--output-dir", str(out),
            "--max-result-images", "0", "--max-persons", "4", *more]
    assert cli.main(argv) == 3  # the corrupt row
    return read_manifest(out / "embeddings_segment" / "manifest.csv")


def test_max_persons_keeps_the_most_confident_and_the_summary_counts_the_photos(
    people_dataset, tiny_onnx, tmp_path, monkeypatch, capsys
):
    rows = crowd_run(Crowd(), people_dataset, tiny_onnx, tmp_path, monkeypatch)
    crowd = Crowd().segment
    for i in (1, 2, 5, 7, 8):  # 3 or 6 persons
        found = crowd([np.full((90, 60, 3), i, np.uint8)])[0]
        best = sorted(found, key=lambda p: -p.confidence)[:4]
        mine = [r for r in rows if r.source_row == i]
        assert [r.confidence for r in mine] == pytest.approx([p.confidence for p in best])
        assert [r.box_x1 for r in mine] == [p.box_xyxy[0] for p in best]  # the same persons, best first
        assert all(("(--max-persons)" in r.note) == (len(found) > 4) for r in mine)
    summary = capsys.readouterr().out  # rows 2, 5 and 8 have 6 persons
    assert "note:     3 photo(s) had more than 4 persons; the 4 most confident of each were kept (--max-persons)" in (
        summary.splitlines()
    )


def _spy_on_predict(segmenter):
    """Record what each predict() call asks of Ultralytics and how many masks each of its results holds."""
    calls: list[dict] = []
    real = segmenter.model.predict

    def predict(**kw):
        call = {"max_det": kw.get("max_det"), "masks": []}
        calls.append(call)
        for r in real(**kw):
            call["masks"].append(0 if r.masks is None else len(r.masks.data))
            yield r

    segmenter.model.predict = predict
    return calls


@pytest.mark.parametrize("backend", ["onnx", "torch"])
def test_a_pictures_persons_do_not_depend_on_the_pictures_beside_it(person_pt, backend):
    """Ultralytics letterboxes a batch of one shape to its smallest rectangle and a mixed one to the
    square, which finds other persons: the engines and an update batch photos differently, so each
    picture is segmented alone, and a portrait photo next to a landscape one keeps its persons."""
    from pipeline.yolo import SegmentSpec, UltralyticsSegmenter

    seg = UltralyticsSegmenter(SegmentSpec(model=str(person_pt), imgsz=160, backend=backend), device="cpu")
    portrait, landscape = (np.asarray(assets.rgb_image(w, h, seed=41 + k)) for k, (w, h) in enumerate(((96, 128),
                                                                                                      (128, 96))))
    alone = seg.segment_capped([portrait], 10)[0].persons
    for batch in ([portrait, landscape], [landscape, portrait, portrait]):
        found = seg.segment_capped(batch, 10)
        for picture, got in zip(batch, found):
            if picture is portrait:
                assert len(got.persons) == len(alone) > 0
                for p, q in zip(got.persons, alone):
                    assert np.array_equal(p.box_xyxy, q.box_xyxy) and np.array_equal(p.mask, q.mask)


def test_ultralytics_stops_at_the_cap_and_says_which_pictures_held_more(person_pt):
    """The person-biased tiny YOLO finds dozens of persons a picture; capped, Ultralytics makes at most
    cap + 1 masks a picture, and a picture is said to hold more when its NMS kept more than the cap."""
    from pipeline.yolo import SegmentSpec, UltralyticsSegmenter

    pictures = _pictures(4)
    spec = SegmentSpec(model=str(person_pt), imgsz=160, backend="torch")
    every = UltralyticsSegmenter(replace(spec, max_persons=300), device="cpu").segment_capped(pictures, 300)
    assert min(len(f.persons) for f in every) > 20 and not any(f.cut for f in every)
    capped = UltralyticsSegmenter(replace(spec, max_persons=3), device="cpu")
    calls = _spy_on_predict(capped)
    found = capped.segment_capped(pictures, 3)
    assert [c["max_det"] for c in calls] == [4] * 4  # one picture a call (on the CPU)
    assert max(m for c in calls for m in c["masks"]) <= 4  # no mask past cap + 1
    assert all(f.cut and len(f.persons) <= 3 for f in found)
    for f, all_of_them in zip(found, every):  # the persons kept are among the most confident of all
        top = {tuple(np.round(p.box_xyxy, 2)) for p in all_of_them.persons[:4]}
        assert {tuple(np.round(p.box_xyxy, 2)) for p in f.persons} <= top
    assert [len(p) for p in capped.segment(pictures)] == [len(f.persons) for f in found]  # segment() keeps the cap


class Maskless(Crowd):
    """As Ultralytics past its cap: persons held but all of the most confident with an empty mask,
    dropped, on the photos whose first pixel is odd."""

    def segment_capped(self, images_rgb, cap):
        return [CappedPersons([], True) if int(im[0, 0, 0]) % 2 else found
                for im, found in zip(images_rgb, super().segment_capped(images_rgb, cap))]


def test_photos_whose_persons_all_lacked_a_mask_are_told_apart_from_those_without_persons(
    people_dataset, tiny_onnx, tmp_path, monkeypatch, capsys
):
    """"rows without person" beside "photo(s) had more than N persons" read as a contradiction: the
    rows whose persons all lacked a mask are counted apart, with where to see which."""
    rows = crowd_run(Maskless(), people_dataset, tiny_onnx, tmp_path, monkeypatch)
    maskless = {r.source_row for r in rows if r.status == "no_person" and r.error.startswith("no person with a mask")}
    # the photos whose first pixel is odd (row 4 the corrupt one) lost theirs; the others without persons had none
    assert maskless == {1, 3, 5, 7}
    assert {r.source_row for r in rows if r.error == "no person detected"} == {0, 6}
    said = " ".join(capsys.readouterr().out.split())
    assert (f"rows without person: {len(maskless)} had persons, but none with a mask among the 4 most confident "
            "(manifest.csv's error column says which; a larger --max-persons looks further)") in said
    # kept whole (--keep-unsegmented): the note said "no person found" beside "the 4 most confident kept"
    kept = crowd_run(Maskless(), people_dataset, tiny_onnx, tmp_path / "whole", monkeypatch, "--keep-unsegmented")
    notes = {r.source_row: r.note for r in kept if r.person < 0 and r.status == "ok"}
    assert all("no person with a mask among the 4 most confident: whole image kept (--keep-unsegmented)" in notes[i]
               for i in maskless) and "no person found" not in " ".join(notes[i] for i in maskless)
    assert all(notes[i].endswith("no person found: whole image kept (--keep-unsegmented)") for i in (0, 6))


def test_max_persons_with_the_person_biased_yolo_counts_every_cut_photo(person_pt, tiny_onnx, tmp_path, capsys):
    from PIL import Image

    cells = [assets.encode(Image.fromarray(p), "PNG") for p in _pictures(3)]
    ds = assets.write_parquet_dataset(tmp_path / "ds", cells)
    out = tmp_path / "out"
    argv = ["--use-segmentation", "--seg-model", str(person_pt), "--seg-imgsz", "160", "--seg-backend", "torch",
            "--dataset", str(ds), "--onnx", str(tiny_onnx), "--output-dir", str(out), "--max-result-images", "0",
            "--max-persons", "2"]
    assert cli.main(argv) == 0
    rows = read_manifest(out / "embeddings_segment" / "manifest.csv")
    assert len([r for r in rows if r.status == "ok"]) <= 3 * 2
    assert {r.source_row for r in rows if "(--max-persons)" in r.note} == {0, 1, 2}
    summary = capsys.readouterr().out
    assert "3 photo(s) had more than 2 persons; the 2 most confident of each were kept" in summary


def test_a_resume_after_the_segmenter_weights_changed_in_place_is_refused(tiny_onnx, tmp_path, monkeypatch, capsys):
    """Retrained weights saved over the same file would crop the rest of an unfinished run with
    another model: the resume is refused, naming the weights; with the first weights back it goes on."""
    import shutil

    from tests.helpers import run, stop_after_shards

    first, second, pt = tmp_path / "w1.pt", tmp_path / "w2.pt", tmp_path / "person-seg.pt"
    assets.person_yolo("yolov8n-seg.yaml", seed=0).save(first)
    assets.person_yolo("yolov8n-seg.yaml", seed=5).save(second)
    cells = [assets.encode(assets.rgb_image(96, 128, seed=40 + i), "JPEG") for i in range(10)]
    data = assets.write_parquet_dataset(tmp_path / "people", cells)
    flags = ["--dataset", data, "--onnx", tiny_onnx, "--output-dir", tmp_path / "out", "--shard-rows", "4",
             "--batch-size", "4", "--max-result-images", "0", "--use-segmentation", "--seg-model", pt,
             "--seg-imgsz", "160"]
    shutil.copy(first, pt)
    stop_after_shards(monkeypatch, 1)
    assert run(*flags) == 130
    monkeypatch.undo()
    shutil.copy(second, pt)
    capsys.readouterr()
    assert run(*flags) == 1
    err = capsys.readouterr().err  # the one change of the weights listed once (it was also 'segmenter_weights: ...')
    assert err.count("source.seg_weights: cache has") == 1 and "segmenter_weights:" not in err
    shutil.copy(first, pt)
    assert run(*flags) in (0, 3)
    # resumed with the first weights: the store an uninterrupted run with them makes
    fresh = [tmp_path / "fresh" if f == tmp_path / "out" else f for f in flags]
    assert run(*fresh) in (0, 3)
    manifest = "embeddings_segment/manifest.csv"
    assert (tmp_path / "out" / manifest).read_bytes() == (tmp_path / "fresh" / manifest).read_bytes()


def test_a_segmenter_that_cannot_load_is_said_before_the_model_loads(people_dataset, tiny_onnx, tmp_path, monkeypatch,
                                                                      capsys):
    """Detection weights as --seg-model were refused only after CLIP had loaded (16 s here, a
    download online): the segmenter loads first."""
    from pipeline.yolo import YoloTaskError

    loaded = []
    monkeypatch.setattr(galleries, "make_embedder", lambda spec: loaded.append(spec))

    def refuse(spec, device):
        raise YoloTaskError("det.pt is a YOLO detect model: --seg-model needs a segmentation model")

    monkeypatch.setattr(galleries, "make_segmenter", refuse)
    assert cli.main(["--use-segmentation", "--dataset", str(people_dataset), "--onnx", str(tiny_onnx),
                     "--output-dir", str(tmp_path / "out")]) == 1
    assert "is a YOLO detect model" in capsys.readouterr().err
    assert loaded == []


def recording_segmenter(monkeypatch, tmp_path: Path) -> tuple[list, Path]:
    """A FakeSegmenter for every segmenter the gallery code makes, the specs it was made with listed;
    and a weights file (its bytes the store's) for --seg-model."""
    asked: list = []

    def segmenter(spec, device):
        asked.append(spec)
        return FakeSegmenter()

    monkeypatch.setattr(galleries, "make_segmenter", segmenter)
    weights = tmp_path / "people.pt"
    weights.write_bytes(b"the store's weights")
    return asked, weights


def test_a_search_of_a_segmented_store_cuts_query_persons_with_the_stores_segmenter(
        people_dataset, tiny_onnx, tmp_path, monkeypatch, capsys):
    """No --seg-* flag with a cache flag: the query picture's persons are cut by the segmenter the
    store's crops were cut with (its model, confidence, size), not the default model, which would cut
    others (or, offline, fail to load); its weights retrained under the same name are refused."""
    asked, weights = recording_segmenter(monkeypatch, tmp_path)
    out = tmp_path / "out"
    base = ["--onnx", str(tiny_onnx), "--output-dir", str(out), "-q"]
    assert cli.main(["--use-segmentation", "--dataset", str(people_dataset), "--seg-model", str(weights),
                     "--seg-conf", "0.4", "--seg-imgsz", "320", "--max-persons", "3", *base]) == 3
    query = tmp_path / "look.png"
    query.write_bytes(assets.encode(assets.rgb_image(60, 90, color=(2, 100, 200)), "PNG"))
    asked.clear()
    assert cli.main(["--use-embedded-segment", "--query-image", str(query), *base]) == 0
    # the persons a photo too: the default 10 asked with more persons than the store kept of each
    assert [(s.model, s.conf, s.imgsz, s.max_persons) for s in asked] == [(str(weights), 0.4, 320, 3)]
    # Catalog.open too: it cut query persons with the defaults (another model, size, conf and cap)
    from pipeline import catalog as catalog_module
    from pipeline.catalog import Catalog

    monkeypatch.setattr(catalog_module, "make_segmenter", galleries.make_segmenter)  # the recording one
    asked.clear()
    cat = Catalog.open(out, onnx=tiny_onnx)
    assert cat.search_text("a person", k=2)  # a text query needs no segmenter
    assert asked == []
    cat.search_image(query, segment=True)
    assert [(s.model, s.conf, s.imgsz, s.max_persons) for s in asked] == [(str(weights), 0.4, 320, 3)]
    capsys.readouterr()  # a flag typed is checked against the store, as before
    assert cli.main(["--use-embedded-segment", "--query-image", str(query), "--seg-conf", "0.6", *base]) == 1
    assert "seg_conf: cache has 0.4, asked for 0.6" in capsys.readouterr().err
    weights.write_bytes(b"retrained under the same name")
    assert cli.main(["--use-embedded-segment", "--query-image", str(query), *base]) == 1
    assert f"was segmented by {weights}, whose weights changed since" in capsys.readouterr().err
    from pipeline.errors import CacheMismatchError, PipelineError

    with pytest.raises(CacheMismatchError, match="whose weights changed since"):
        Catalog.open(out, onnx=tiny_onnx).search_image(query, segment=True)
    weights.unlink()
    assert cli.main(["--use-embedded-segment", "--query-image", str(query), *base]) == 1
    assert "which is not there from here: pass --seg-model PATH" in capsys.readouterr().err
    with pytest.raises(PipelineError, match="which is not there from here: pass seg_model=PATH"):
        Catalog.open(out, onnx=tiny_onnx).search_image(query, segment=True)


def test_weights_that_do_not_load_are_refused_once(tmp_path, caplog):
    """A damaged .pt: one error naming it, not a warning that its export failed and then the same error."""
    import logging

    from pipeline.errors import PipelineError
    from pipeline.yolo import load_cpu_yolo

    bad = tmp_path / "people.pt"
    bad.write_bytes(b"not a torch checkpoint")
    with caplog.at_level(logging.WARNING), pytest.raises(PipelineError) as said:
        load_cpu_yolo(str(bad), task="detect", device="cpu")  # the ONNX branch, on a machine with a GPU too
    assert str(bad) in str(said.value)
    assert "ONNX export" not in caplog.text and not caplog.records


def test_a_yolo_export_removes_the_work_folders_killed_exports_left(tmp_path, monkeypatch):
    """A YOLO ONNX export killed midway left its work folder (about the file's size) beside the weights
    for good; the next export to that target removes those a day old, not one another export uses now."""
    import os
    import time

    from pipeline import fileio
    from pipeline.errors import PipelineError

    target = tmp_path / "person-seg.onnx"
    old, busy = tmp_path / ".person-seg.abc123.export", tmp_path / ".person-seg.def456.export"
    for folder in (old, busy):
        folder.mkdir()
        (folder / "person-seg.onnx").write_bytes(b"x" * 1024)
    os.utime(old, (time.time() - fileio.ABANDONED_AFTER_S - 60,) * 2)
    monkeypatch.setattr(yolo, "load_yolo", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("no exporter here")))
    weights = tmp_path / "person-seg.pt"
    weights.write_bytes(b"weights")
    with pytest.raises(PipelineError, match="ONNX export failed: RuntimeError: no exporter here"):
        yolo.export_yolo_onnx(None, weights, target, 64)
    assert not old.exists() and busy.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".person-seg.def456.export", "person-seg.pt"]


def test_a_file_or_folder_that_is_no_yolo_weights_is_said_to_be_so(tmp_path):
    """Ultralytics takes what it cannot read for a detection model: the folder holding the -seg weights,
    or a JSON file, was "a YOLO detect model", which told the user their weights were the wrong kind."""
    from pipeline.errors import PipelineError

    notes = tmp_path / "notes.json"
    notes.write_text("{}")
    weights = tmp_path / "weights"
    weights.mkdir()
    for given, what in ((notes, "a .json file"), (weights, "a folder")):
        with pytest.raises(PipelineError) as said:
            yolo.load_yolo(str(given), task="segment")
        assert str(said.value).startswith(f"YOLO model {str(given)!r} is {what}, not YOLO weights: pass a .pt, .onnx "
                                          "or model .yaml file")
        assert "detect" not in str(said.value)


def test_an_update_of_a_segmented_store_cuts_new_photos_as_the_store_did_without_its_flags(
        tiny_onnx, tmp_path, monkeypatch, capsys):
    """--update --use-segmentation with no --seg-* flag was refused "made differently" (listing the
    fields keep_unsegmented, max_persons, seg_conf, seg_model): the nightly job had to repeat them all.
    It takes them from the store, as it takes its --dataset, and says so."""
    asked, weights = recording_segmenter(monkeypatch, tmp_path)
    cells = [assets.encode(assets.rgb_image(60, 90, color=(i, 100, 200)), "PNG") for i in range(6)]
    data = assets.write_parquet_dataset(tmp_path / "people", cells)
    out = tmp_path / "out"
    base = ["--onnx", str(tiny_onnx), "--output-dir", str(out)]
    assert cli.main(["--use-segmentation", "--dataset", str(data), "--seg-model", str(weights),
                     "--seg-conf", "0.4", "--seg-imgsz", "320", "--max-persons", "3", "--keep-unsegmented", *base,
                     "-q"]) == 0
    assets.write_parquet_dataset(tmp_path / "people", [*cells, assets.encode(assets.rgb_image(60, 90, color=(7, 9, 9)),
                                                                             "PNG")])  # a new photo to cut
    asked.clear()
    capsys.readouterr()
    assert cli.main(["--update", "--use-segmentation", *base]) == 0
    said = " ".join(capsys.readouterr().err.split())
    assert "made differently" not in said and asked
    assert f"--update: the store's own --dataset {data}" in said
    for flag in (f"--seg-model {weights}", "--seg-conf 0.4", "--seg-imgsz 320", "--max-persons 3",
                 "--keep-unsegmented"):
        assert flag in said, flag
    assert all((s.model, s.conf, s.imgsz, s.max_persons, s.keep_unsegmented) == (str(weights), 0.4, 320, 3, True)
               for s in asked)


def test_a_videos_frames_are_not_capped_by_the_stores_persons_a_photo():
    """The store's --max-persons is taken for query pictures; a video's frames (300 persons) kept it too."""
    from pathlib import Path

    from pipeline.identity import GallerySource
    from pipeline.yolo import SegmentSpec, recorded_segment

    made = GallerySource(dataset="x", kind="segment", max_persons=3, seg_conf=0.4)
    spec, taken = recorded_segment(made, SegmentSpec(max_persons=300), frozenset(), Path("s"), persons=False)
    assert spec.max_persons == 300 and taken == {"conf": 0.4}
    spec, taken = recorded_segment(made, SegmentSpec(), frozenset(), Path("s"))
    assert (spec.max_persons, spec.conf) == (3, 0.4)
