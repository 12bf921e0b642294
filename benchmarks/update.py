"""--update against a fresh build: a gallery of N generated 768x1024 JPEGs (int8 ONNX, the real
FashionCLIP architecture with random weights) built once, then brought up to date after 1% new
photos were added, and after 1% were removed. Each run is main.py in a fresh process, as a user
runs it; the table gives each one's wall time and its share of the fresh build's.

    python -m benchmarks.update --n 10000
    python -m benchmarks.update --tiny          # 40 small pictures, tiny model: checks the script
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from benchmarks.common import (
    Assets,
    encode_picture,
    machine_line,
    make_parser,
    parse_args,
    run_main_py,
    write_image_parquet,
)
from pipeline.dataset import DatasetSpec


def photo_file(assets: Assets, folder: Path, n: int) -> Path:
    """Photos 0..n-1 encoded once into folder/photos_N.parquet (one binary column), so that the
    three catalogues are rows taken from it rather than the pictures made again each time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = folder / f"photos_{n}.parquet"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        with pq.ParquetWriter(tmp, pa.schema([("jpeg", pa.binary())])) as writer:
            for start in range(0, n, 250):
                chunk = [encode_picture(assets.photo(i)) for i in range(start, min(n, start + 250))]
                writer.write_table(pa.table({"jpeg": pa.array(chunk, pa.binary())}))
        tmp.rename(path)
    return path


def catalogue(photos: Path, folder: Path, rows: list[int], file_rows: int = 0) -> Path:
    """The catalogue at `folder` holding photos `rows` (photo i is the same picture wherever it sits):
    one parquet file, or with file_rows files of that many rows, a file left as it is when it holds
    the same photos as before (as a sync of a sharded export would)."""
    import json

    import pyarrow.parquet as pq

    column = pq.read_table(photos).column("jpeg")
    data, record = folder / "data", folder.parent / f"{folder.name}.files.json"
    data.mkdir(parents=True, exist_ok=True)
    chunks = [rows[i : i + file_rows] for i in range(0, len(rows), file_rows)] if file_rows else [rows]
    names = [f"train-{i:05d}.parquet" for i in range(len(chunks))] if file_rows else ["train-00000-of-00001.parquet"]
    before = json.loads(record.read_text()) if record.is_file() else {}
    for old in data.glob("*.parquet"):  # every file there is the dataset's
        if old.name not in names or before.get(old.name) != chunks[names.index(old.name)]:
            old.unlink()
    for name, chunk in zip(names, chunks):
        if not (data / name).is_file():
            write_image_parquet(data / name, (column[i].as_py() for i in chunk), chunk=250, row_group_size=50)
    record.write_text(json.dumps(dict(zip(names, chunks))))
    # The 2.4 GB just written reach the disk before a timed run starts: otherwise the kernel writes them
    # back during the run, and the run is charged for the benchmark's own set-up.
    os.sync()
    return folder


def main(argv: list[str] | None = None) -> int:
    ap = make_parser(__doc__)
    ap.add_argument("--n", type=int, default=10000, help="photos in the gallery")
    ap.add_argument("--percent", type=float, default=1.0, help="share of photos added, then removed")
    args = parse_args(ap, argv, tiny={"n": 40, "percent": 10.0})
    print(machine_line(), flush=True)
    assets = Assets.from_args(args)
    onnx = assets.onnx("static")
    k = max(1, round(args.n * args.percent / 100))
    data, out = args.work / f"update{args.n}" / "catalogue", args.work / f"update{args.n}" / "run"
    shutil.rmtree(out, ignore_errors=True)
    flags = ["--dataset", str(data), "--onnx", str(onnx), "--output-dir", str(out), "--limit", "0"]
    photos = photo_file(assets, args.work / f"update{args.n}", args.n + k)
    from pipeline.datarecord import hashes_file

    hashes_file(DatasetSpec(str(data))).unlink(missing_ok=True)  # an earlier run's record of these files
    catalogue(photos, data, list(range(args.n)))
    runs = {"fresh build": run_main_py(flags).check("the fresh build")}
    catalogue(photos, data, list(range(args.n + k)))
    runs[f"update: {k} added"] = run_main_py([*flags, "--update"]).check("the update that adds")
    kept = [i for i in range(args.n + k) if i % (args.n // k + 1) != 7] if k else list(range(args.n))
    catalogue(photos, data, kept)
    removed = args.n + k - len(kept)
    runs[f"update: {removed} removed"] = run_main_py([*flags, "--update"]).check("the update that removes")
    # The same photos in files of 250 rows: the first update reads them all (and keeps what they hold in the
    # user's cache); then the removed photos come back at the end, which only the last files hold.
    per = min(250, max(5, args.n // 8))
    catalogue(photos, data, kept, file_rows=per)
    runs[f"in {per}-row files: nothing changed"] = run_main_py([*flags, "--update"]).check("the update of the files")
    catalogue(photos, data, [*kept, *sorted(set(range(args.n + k)) - set(kept))], file_rows=per)
    runs[f"in {per}-row files: {removed} added, in new files"] = run_main_py([*flags, "--update"]).check(
        "the update that adds files")
    fresh = runs["fresh build"].wall_s
    print(f"\n| N = {args.n} | wall | share of the fresh build | stages over 1 s |\n|---|---|---|---|")
    for name, run in runs.items():
        slow = ", ".join(f"{stage} {s:.1f} s" for stage, s in run.stages.items() if s >= 1.0)
        print(f"| {name} | {run.wall_s:.1f} s | {100 * run.wall_s / fresh:.1f}% | {slow} |")
        said = next((line for line in run.stdout.splitlines() if line.startswith("note:     update:")), "")
        if said:
            print(f"|   | {said.removeprefix('note:     ')} | | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
