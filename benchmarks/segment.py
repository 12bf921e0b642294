"""Segmentation speed and ONNX fidelity on generated 768x1024 images, for yolov8n-seg and yolov8l-seg
built from their yaml (seeded random weights; speed does not depend on them):

- predict alone and the whole segmentation stage (decode, predict, crops, PNG encode, write), so
  the share of the stage spent outside predict shows;
- the same for the ONNX export that `--seg-backend auto` makes and runs in onnxruntime, with the
  persons it finds compared to torch's: same count per image, box difference in pixels, mask IoU.

Random weights would find nobody, or masks that do not depend on the picture, so the models come
from tests.assets.person_yolo (BatchNorm recalibrated, head biased to class 0, max 4 persons); the
torch and ONNX models carry the same weights (the .pt saved from it, then exported).

    python -m benchmarks.segment [--images 8] [--models n l]
    python -m benchmarks.segment --tiny               # yolov8n-seg on 2 small pictures: checks the script
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.common import Assets, encode_picture, machine_line, make_parser, parse_args


def mask_iou(a: list, b: list) -> list[float]:
    """IoU of each of a's masks with b's mask of the best-matching box."""
    from pipeline.persons import box_iou

    if not a or not b:
        return []
    ious = box_iou(np.stack([p.box_xyxy for p in a]), np.stack([p.box_xyxy for p in b]))
    out = []
    for i in range(len(a)):
        m1, m2 = a[i].mask, b[int(ious[i].argmax())].mask
        union = np.logical_or(m1, m2).sum()
        out.append(float(np.logical_and(m1, m2).sum() / union) if union else 1.0)
    return out


def stage(seg, records, spec, work: Path) -> tuple[float, float, int]:
    """(stage seconds, predict seconds, crops) for the gallery's segmentation item maker."""
    from pipeline.items import make_segment_items

    make_items = make_segment_items(seg, spec)
    make_items(records[:2])  # warm-up
    seg.predict_seconds = 0.0
    t, crops = time.perf_counter(), 0
    for k in range(0, len(records), 8):
        for its in make_items(records[k : k + 8]):
            for it in its:
                if it.data is not None:
                    (work / it.row.file).write_bytes(it.data)
                    crops += 1
    return time.perf_counter() - t, seg.predict_seconds, crops


def run_backends(pt: Path, records, arrays, work: Path, imgsz: int | None) -> dict[str, tuple[float, float, list]]:
    """{backend: (stage seconds, predict seconds, persons found in `arrays`)} for torch and ONNX."""
    from pipeline.yolo import SegmentSpec, UltralyticsSegmenter

    results = {}
    for backend in ("torch", "onnx"):
        # At most 3 persons a picture (Ultralytics is asked for 4): the person-biased model fires everywhere.
        spec = SegmentSpec(model=str(pt), backend=backend, max_persons=3, **({"imgsz": imgsz} if imgsz else {}))
        t = time.perf_counter()
        seg = UltralyticsSegmenter(spec, device="cpu")
        load = time.perf_counter() - t
        assert seg.backend == backend, seg.backend
        wall, predict, crops = stage(seg, records, spec, work)
        seg.predict_seconds = 0.0
        results[backend] = (wall, predict, seg.segment(arrays))
        print(
            f"{pt.stem} {backend}: load/export {load:.1f} s, stage {wall / len(records) * 1000:.0f} ms/img, "
            f"predict {predict / len(records) * 1000:.0f} ms/img, {crops} crops",
            flush=True,
        )
    return results


def table_row(size: str, results: dict[str, tuple[float, float, list]], n: int) -> str:
    (tw, tp, tpers), (ow, op, opers) = results["torch"], results["onnx"]
    ious = [v for a, b in zip(tpers, opers) for v in mask_iou(a, b)]
    box = max(
        (
            float(np.abs(np.stack([p.box_xyxy for p in a]) - np.stack([p.box_xyxy for p in b])).max())
            for a, b in zip(tpers, opers)
            if a and len(a) == len(b)
        ),
        default=float("nan"),
    )
    return (
        f"| yolov8{size}-seg | {tp / n * 1000:.0f} ms | {tw / n * 1000:.0f} ms | {(tw - tp) / tw:.1%} | "
        f"{op / n * 1000:.0f} ms | "
        f"{ow / n * 1000:.0f} ms | {(ow - op) / ow:.1%} | {sum(map(len, tpers))} / {sum(map(len, opers))} (same "
        f"per image: {[len(a) for a in tpers] == [len(b) for b in opers]}) | "
        f"{box:.4f} | {min(ious, default=float('nan')):.4f} / {np.mean(ious) if ious else float('nan'):.4f} |"
    )


def main(argv: list[str] | None = None) -> int:
    ap = make_parser(__doc__, model=False)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--models", nargs="+", default=["n", "l"])
    ap.add_argument("--imgsz", type=int, default=None, help="YOLO input size (default: the product's, --seg-imgsz)")
    args = parse_args(ap, argv, tiny={"images": 2, "models": ["n"], "imgsz": 256})
    print(machine_line(), flush=True)
    os.environ.setdefault("YOLO_OFFLINE", "1")
    from pipeline.dataset import Record
    from pipeline.images import decode_image
    from tests.assets import person_yolo

    assets = Assets.from_args(args)
    work = args.work / "segment"
    work.mkdir(parents=True, exist_ok=True)
    records = [Record(i, f"gen[{i}]", encode_picture(assets.photo(i))) for i in range(args.images)]
    arrays = [np.asarray(decode_image(r.data).image) for r in records]
    calib_wh = assets.size_wh if args.tiny else (480, 640)  # sides multiples of 32
    calib = [np.asarray(assets.photo(100 + i).resize(calib_wh)) for i in range(4)]
    lines = [
        "| model | torch predict | torch stage | outside predict | ONNX predict | ONNX stage | outside predict "
        "| persons torch / ONNX | box diff px | mask IoU min / mean |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for size in args.models:
        pt = work / f"person-yolov8{size}-seg.pt"
        for old in work.glob(f"person-yolov8{size}-seg*"):
            old.unlink()
        person_yolo(f"yolov8{size}-seg.yaml", calibration=calib).save(pt)
        lines.append(table_row(size, run_backends(pt, records, arrays, work, args.imgsz), len(records)))
        print(lines[-1], flush=True)
    print("\n" + "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
