"""Shared benchmark helpers: generated catalogues and the real FashionCLIP architecture with random
weights (speed does not depend on weight values). Everything lands under --work (default
/tmp/fashion-bench) and is reused between runs."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def machine_line() -> str:
    """The CPU this benchmark ran on (model and int8 instruction sets): figures are comparable only
    between runs on the same kind of CPU."""
    from pipeline.machine import cpu_info, cpu_label

    return f"machine: {cpu_label()}, {cpu_info()['cores']} cores"


def photo_like(i: int, w: int = 768, h: int = 1024) -> Image.Image:
    """A 768x1024 picture with smooth regions, edges and sensor-like noise, so JPEG sizes and
    decode costs resemble catalogue photos (~100-200 KB at quality 90)."""
    rng = np.random.default_rng(i)
    small = rng.integers(0, 256, size=(12, 9, 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC), dtype=np.int16)
    y0, x0 = rng.integers(100, 500, 2)
    base[y0 : y0 + 400, x0 : x0 + 220] = rng.integers(0, 256, 3)  # a garment-like block
    noise = rng.normal(0, 9, size=(h, w, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def make_jpeg_dataset(folder: Path, n: int, w: int = 768, h: int = 1024) -> Path:
    """A parquet dataset of n JPEGs (rows written in chunks, so memory stays small)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = folder / f"jpeg{n}_{w}x{h}"
    target = out / "data" / "train-00000-of-00001.parquet"
    if target.is_file():
        return out
    target.parent.mkdir(parents=True, exist_ok=True)
    schema = pa.schema([("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())]))])
    # Hugging Face's Image feature, so datasets reads the column as images.
    meta = {b"huggingface": b'{"info": {"features": {"image": {"_type": "Image"}}}}'}
    schema = schema.with_metadata(meta)
    tmp = target.with_suffix(".tmp")
    with pq.ParquetWriter(tmp, schema) as writer:
        chunk = []
        for i in range(n):
            buf = io.BytesIO()
            photo_like(i % 500 + 1000 * (i // 500), w, h).save(buf, format="JPEG", quality=90)
            chunk.append({"bytes": buf.getvalue(), "path": None})
            if len(chunk) == 250 or i == n - 1:
                writer.write_table(pa.table({"image": chunk}, schema=schema), row_group_size=50)
                chunk = []
    tmp.rename(target)
    return out


def real_arch_clip(work: Path) -> Path:
    from tests.assets import save_real_arch_clip

    path = work / "fashion-clip-arch"
    if not (path / "model.safetensors").is_file():
        save_real_arch_clip(path)
    return path


def real_arch_onnx(work: Path, quantization: str = "static") -> Path:
    """fp32 + int8 ONNX of the real architecture, made with the pipeline's own export."""
    from pipeline.export import export_onnx

    path = work / "onnx" / f"fashion_clip_image_int8_{quantization}.onnx"
    if not path.is_file():
        export_onnx(str(real_arch_clip(work)), path, quantization=quantization)
    return path
