"""Prove that a refactor changed no behaviour: run every mode of main.py on fixed fixtures, hash
what each wrote, and compare the hashes of two checkouts.

    python -m tools.compare_outputs run OUT_DIR [--repo PATH] [--assets DIR]
    python -m tools.compare_outputs diff A/hashes.json B/hashes.json

`run` makes seeded fixtures in OUT_DIR/assets (tiny CLIP, a 30-row parquet dataset with a `cloth`
column, a 2 s clip, the tests' person-finding YOLO stand-ins; or copies them from --assets DIR),
runs each mode as a fresh `python main.py` process in the checkout --repo (default: this one) into
OUT_DIR/runs/<mode> (its errors-only output into OUT_DIR/logs/<mode>.log), and writes
OUT_DIR/hashes.json: every mode's exit code, the sha256 of every output file and log, and of every
fixture. Before hashing, OUT_DIR and --repo in any file become $OUT and $REPO, and JSON timings are
dropped (VOLATILE_KEYS); files that differ between two identical runs anyway are left out
(EXCLUDED). Both lists come from running the baseline twice; hashes.json names the files each
touched. `diff` prints what differs or is missing, and exits 1 if anything does.

The fixtures are made by this checkout's tests.assets; to measure another checkout on exactly the
same ones, pass --assets BEFORE_DIR/assets (the diff also compares the fixtures' digests).
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.assets makes the fixtures
ROWS = 30
QUERY_TEXTS = ["red floral dress", "blue shirt"]

# Files (glob below OUT_DIR/runs) that differ between two identical runs: not hashed.
EXCLUDED = {"*/.pipeline.lock": "the output folder's lock: the PID of the run that held it"}
# JSON keys (in .json, .jsonl and the report's sections/*.js) dropped before hashing.
VOLATILE_KEYS = {
    "finished": "clock time the run ended",
    "written": "clock time the report section was written",
    "wall_s": "the run's wall time",
    "peak_mib": "the run's peak memory",
    "build_seconds": "the index's build time",
    "manifest_sha256": "hash of a manifest that names the fixtures' absolute path (the manifest is hashed itself)",
}
# "stages" (seconds per stage) keeps the stage names only; numbers in a "notes" line about rates are masked.
RATE_NOTE = re.compile(r"per second")
SECTION_JS = re.compile(r"(?s)(window\.__report\.section\()(.*)(\);?\s*)")


# ----------------------------------------------------------------------------- fixtures
def _photo(i: int):
    """Dataset row i's picture: a garment on a grey floor, noisy (row 1: a wider scene, two garments)."""
    import numpy as np
    from PIL import Image

    from tests import assets

    if i == 1:
        scene = np.full((180, 320, 3), 128, np.uint8)
        scene[30:126, 60:108] = assets.garment(0)
        scene[40:136, 200:248] = assets.garment(1)
        return Image.fromarray(scene)
    photo = Image.new("RGB", (96, 128), (128, 128, 128))
    photo.paste(_cloth(i), (20 + i % 7, 16 + i % 5))
    noise = np.random.default_rng(i).normal(0, 4.0, (128, 96, 3))
    return Image.fromarray(np.clip(np.asarray(photo, np.float64) + noise, 0, 255).astype(np.uint8))


def _cloth(i: int):
    from tests import assets

    return assets.rgb_image(48, 96, seed=200 + i)


def _dataset(folder: Path) -> Path:
    """ROWS photos (JPEG; row 5 PNG, row 7 not a picture), each with its garment in `cloth`."""
    from tests import assets

    photos = [assets.encode(_photo(i), "PNG" if i == 5 else "JPEG", quality=85) for i in range(ROWS)]
    photos[7] = assets.corrupt_bytes()
    cloths = [assets.encode(_cloth(i), "JPEG", quality=95) for i in range(ROWS)]
    return assets.write_parquet_dataset(folder, photos, extra={"cloth": cloths})


def _clip(path: Path) -> Path:
    """60 frames at 30 fps, 320x180: two garments walking towards each other."""
    from tests import assets

    def scene(i: int):
        return [(0, [20 + 2 * i, 40, 68 + 2 * i, 136]), (1, [250 - 2 * i, 30, 298 - 2 * i, 126])]

    path.parent.mkdir(parents=True, exist_ok=True)
    return assets.write_walking_clip(path, scene, frames=60)


def _yolos(folder: Path) -> None:
    """The tests' person-finding YOLO stand-ins (tests.assets.person_yolo), their BatchNorms
    calibrated on the pictures they will see, at the size they will see them, and their person
    score biased down so that a few persons a picture pass the default confidence of 0.25: a
    saved .pt keeps no max_det, and uncalibrated ones find hundreds (one label then overflows
    its tile, and pipeline.plots draws "…" with a font that cannot)."""
    import cv2
    import numpy as np
    from PIL import Image

    from tests.assets import person_yolo

    reader, frames = cv2.VideoCapture(str(folder / "videos" / "clip_1.mp4")), []
    while len(frames) < 4 and reader.grab():
        frames.append(cv2.cvtColor(reader.retrieve()[1], cv2.COLOR_BGR2RGB))
        for _ in range(14):
            reader.grab()
    calibration = [np.asarray(Image.fromarray(f).resize((640, 352))) for f in frames]
    person_yolo("yolov8n.yaml", calibration=calibration, score_bias=-4.0).save(folder / "person-det.pt")
    calibration = [np.asarray(_photo(i).resize((128, 160))) for i in range(6)]
    person_yolo("yolov8n-seg.yaml", calibration=calibration, score_bias=-3.0).save(folder / "person-seg.pt")


def make_assets(folder: Path) -> None:
    """Every fixture, seeded, under folder (made by this checkout's tests.assets)."""
    from tests import assets

    assets.save_tiny_clip(folder / "tiny-clip")
    _dataset(folder / "dataset")
    _clip(folder / "videos" / "clip_1.mp4")
    _yolos(folder)
    queries = folder / "queries"
    queries.mkdir(exist_ok=True)
    assets.rgb_image(48, 96, seed=203).save(queries / "garment_3.png")
    assets.rgb_image(80, 100, seed=999).save(queries / "other.jpg", quality=90)


def _pt_digest(path: Path) -> str:
    """sha256 of a YOLO checkpoint's weights (the file itself carries the date it was saved)."""
    import torch

    h = hashlib.sha256()
    for name, t in torch.load(path, map_location="cpu", weights_only=False)["model"].state_dict().items():
        h.update(name.encode() + t.numpy().tobytes())
    return h.hexdigest()


def assets_digest(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): _pt_digest(p) if p.suffix == ".pt" else _sha(p.read_bytes())
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


# ----------------------------------------------------------------------------- runs
def modes(a: Path) -> list[tuple[str, str | None, list[str]]]:
    """(mode, earlier mode whose output folder it starts from a copy of, flags) in run order;
    a = the fixtures folder. The YOLO stand-ins run in PyTorch: no ONNX export in the fixtures."""
    model = ["--model", str(a / "tiny-clip"), "--backend", "torch", "-q"]
    data = ["--dataset", str(a / "dataset"), "--limit", str(ROWS)]
    seg = ["--seg-model", str(a / "person-seg.pt"), "--seg-backend", "torch", "--seg-imgsz", "160"]
    video = ["--video_clip", "clip_1", "--video_dir", str(a / "videos"), "--frame-stride", "15"]
    det = ["--det-model", str(a / "person-det.pt"), "--det-backend", "torch"]
    return [
        ("standard", None, [*data, *model]),
        ("standard_hnsw", None, [*data, *model, "--index", "hnsw"]),
        ("use_embeddings", "standard", ["--use-embeddings", *model]),
        ("segmentation", None, ["--use-segmentation", *data, *model, *seg]),
        ("query_image", "standard", ["--query-image", str(a / "queries"), *model]),
        ("query_text", "standard", ["--query-text", *QUERY_TEXTS, *model]),
        ("evaluate", None, ["--evaluate", *data, *model]),
        ("video", None, [*video, *det, *data, *model]),
    ]


def run_modes(repo: Path, out: Path, a: Path) -> tuple[dict[str, int], dict[str, list[str]]]:
    """Each mode as a fresh `python main.py` in repo, offline, caches inside out.
    Returns (mode -> exit code, mode -> its main.py arguments)."""
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        YOLO_OFFLINE="1",
        TRANSFORMERS_VERBOSITY="error",
        PYTHONHASHSEED="0",
        HF_HOME=str(out / "cache" / "hf"),
        XDG_CACHE_HOME=str(out / "cache"),
        YOLO_CONFIG_DIR=str(out / "cache" / "ultralytics"),
    )
    (out / "logs").mkdir(parents=True, exist_ok=True)
    codes, commands = {}, {}
    for mode, start_from, flags in modes(a):
        target = out / "runs" / mode
        if start_from:
            shutil.copytree(out / "runs" / start_from, target)
        commands[mode] = [*flags, "--output-dir", str(target)]
        t0 = time.monotonic()
        with open(out / "logs" / f"{mode}.log", "wb") as log:
            argv = [sys.executable, "main.py", *commands[mode]]
            codes[mode] = subprocess.run(argv, cwd=repo, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
        print(f"{mode:15s} exit {codes[mode]}  {time.monotonic() - t0:5.1f} s", flush=True)
    return codes, commands


# ----------------------------------------------------------------------------- hashing
def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _clean(key: str, value):
    if key == "stages" and isinstance(value, dict):
        return list(value)  # which stages ran, in order; not their seconds
    if key == "notes" and isinstance(value, list):
        return [re.sub(r"\d+(\.\d+)?", "#", n) if isinstance(n, str) and RATE_NOTE.search(n) else n for n in value]
    return _drop_volatile(value)


def _drop_volatile(obj):
    if isinstance(obj, dict):
        return {k: _clean(k, v) for k, v in obj.items() if k not in VOLATILE_KEYS}
    if isinstance(obj, list):
        return [_drop_volatile(v) for v in obj]
    return obj


def _json_docs(rel: str, text: str) -> list | None:
    """The JSON documents in a .json, .jsonl or report section .js file, else None."""
    try:
        if rel.endswith(".json"):
            return [json.loads(text)]
        if rel.endswith(".jsonl"):
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        if "/report/sections/" in rel and (m := SECTION_JS.fullmatch(text)):
            return [json.loads(m.group(2))]
    except ValueError:
        pass
    return None


def normalized(rel: str, data: bytes, places: dict[str, Path]) -> bytes:
    """data with the places' paths replaced by their names ($OUT, $REPO) and its JSON timings dropped."""
    for name, path in places.items():
        data = data.replace(f"{path}/".encode(), f"{name}/".encode())
    try:
        docs = _json_docs(rel, data.decode())
    except UnicodeDecodeError:
        return data
    if docs is None:
        return data
    clean = [_drop_volatile(d) for d in docs]
    return data if clean == docs else json.dumps(clean).encode()


def hash_tree(folder: Path, places: dict[str, Path]) -> tuple[dict[str, str], dict[str, str], list[str]]:
    """(path -> sha256, excluded path -> why, normalized paths) for every file under folder."""
    files, excluded, normal = {}, {}, []
    for p in sorted(folder.rglob("*")):
        if not p.is_file():
            continue
        rel = p.relative_to(folder).as_posix()
        why = next((w for pattern, w in EXCLUDED.items() if fnmatch.fnmatch(rel, pattern)), None)
        if why:
            excluded[rel] = why
            continue
        raw = p.read_bytes()
        data = normalized(rel, raw, places)
        if data != raw:
            normal.append(rel)
        files[rel] = _sha(data)
    return files, excluded, normal


# ----------------------------------------------------------------------------- commands
def _fixtures(out: Path, assets_dir: Path | None) -> Path:
    """OUT_DIR/assets: copied from assets_dir, else made once (kept for the next run into OUT_DIR)."""
    a = out / "assets"
    if assets_dir is not None and assets_dir.resolve() != a:
        shutil.rmtree(a, ignore_errors=True)
        shutil.copytree(assets_dir, a)
    elif not (a / "person-det.pt").is_file():
        t0 = time.monotonic()
        make_assets(a)
        print(f"fixtures made in {time.monotonic() - t0:.1f} s: {a}", flush=True)
    return a


def cmd_run(out: Path, repo: Path, assets_dir: Path | None) -> int:
    out, repo = out.resolve(), repo.resolve()
    if not (repo / "main.py").is_file():
        sys.exit(f"no main.py in {repo}")
    if out.is_relative_to(repo):
        sys.exit(f"OUT_DIR {out} is inside the measured checkout {repo}: put it outside")
    for old in ("runs", "logs", "cache"):
        shutil.rmtree(out / old, ignore_errors=True)
    a = _fixtures(out, assets_dir)
    codes, commands = run_modes(repo, out, a)
    places = {"$OUT": out, "$REPO": repo}
    files, excluded, normal = hash_tree(out / "runs", places)
    commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True)
    report = {
        "repo": str(repo),
        "commit": commit.stdout.strip(),
        "exit_codes": codes,
        "commands": {m: shlex.join(c).replace(f"{out}/", "$OUT/") for m, c in commands.items()},
        "assets": assets_digest(a),
        "files": files,
        "logs": hash_tree(out / "logs", places)[0],
        "normalized": normal,
        "excluded": excluded,
        "rules": {"paths": {k: str(v) for k, v in places.items()}, "volatile_keys": VOLATILE_KEYS},
    }
    (out / "hashes.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"{len(files)} files hashed ({len(normal)} normalized), {len(excluded)} excluded: {out / 'hashes.json'}")
    return 0


def cmd_diff(a_path: Path, b_path: Path) -> int:
    """Print every exit code, fixture, output file and log that differs or is missing; 1 if any."""
    a, b = (json.loads(p.read_text()) for p in (a_path, b_path))
    problems = []
    for section in ("exit_codes", "assets", "files", "logs"):
        x, y = a.get(section, {}), b.get(section, {})
        for key in sorted(set(x) | set(y)):
            if key not in y:
                problems.append(f"{section}: only in A: {key}")
            elif key not in x:
                problems.append(f"{section}: only in B: {key}")
            elif x[key] != y[key]:
                change = f" ({x[key]} -> {y[key]})" if section == "exit_codes" else ""
                problems.append(f"{section}: differs: {key}{change}")
    for line in problems:
        print(line)
    n = len(a.get("files", {}))
    print(f"{len(problems)} difference(s)" if problems else f"identical: exit codes, fixtures, logs and {n} files")
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m tools.compare_outputs", description="Hash every mode's outputs; compare two checkouts."
    )
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="make fixtures, run every mode, write OUT_DIR/hashes.json")
    r.add_argument("out", type=Path, metavar="OUT_DIR")
    r.add_argument("--repo", type=Path, default=ROOT, help="checkout whose main.py is measured (default: this one)")
    r.add_argument("--assets", type=Path, help="reuse the fixtures of an earlier run (OUT_DIR/assets) instead")
    d = sub.add_parser("diff", help="compare two hashes.json; exit 1 if anything differs")
    d.add_argument("a", type=Path)
    d.add_argument("b", type=Path)
    args = p.parse_args(argv)
    if args.command == "run":
        return cmd_run(args.out, args.repo, args.assets)
    return cmd_diff(args.a, args.b)


if __name__ == "__main__":
    sys.exit(main())
