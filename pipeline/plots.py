"""Pictures: thumbnails, result composites (query + top-k, drawn with PIL from thumbnails made once),
the distance-matrix heatmap and the nearest-neighbour histogram (matplotlib, Agg).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .fileio import atomic_write_bytes
from .images import encode_jpeg

THUMB_SIZE = 128
_CAPTION_H = 30
_PAD = 6


def make_thumbnail(image: Image.Image, size: int = THUMB_SIZE) -> np.ndarray:
    """Fit an RGB image into a size x size white square, keeping its aspect: uint8 (size, size, 3)."""
    im = image.copy()
    im.thumbnail((size, size), Image.Resampling.BILINEAR, reducing_gap=2.0)
    canvas = Image.new("RGB", (size, size), (255, 255, 255))
    canvas.paste(im, ((size - im.width) // 2, (size - im.height) // 2))
    return np.asarray(canvas)


@lru_cache(maxsize=1)
def caption_font() -> ImageFont.ImageFont:
    """Pillow's built-in bitmap font: far cheaper to draw than the FreeType default, which matters
    at 10,000 composites of a dozen captions each. (load_default_imagefont: Pillow >= 10.1; we need 11.)"""
    return ImageFont.load_default_imagefont()


def drawable(text: str) -> str:
    """Text the bitmap font can draw: it has Latin-1 only, so other characters (an ellipsis, a CJK
    file name or query) become '?' instead of failing the drawing with UnicodeEncodeError."""
    return text.encode("latin-1", "replace").decode("latin-1")


def fit_text(text: str, limit: int) -> str:
    """The end of a caption that is longer than `limit` characters, after '...' (names differ at the end)."""
    text = drawable(text)
    return text if len(text) <= limit else "..." + text[-max(1, limit - 3) :]


def compose_matches(
    query: np.ndarray,
    query_label: str,
    matches: Sequence[np.ndarray],
    labels: Sequence[str],
    title: str = "",
) -> Image.Image:
    """One row: the query tile, then each match tile with its caption (e.g. "d=0.123 img_00042.jpg").

    Args:
        query: uint8 (T, T, 3) RGB tile.
        matches: uint8 (T, T, 3) RGB tiles, best first.
        labels: one caption per match.
    """
    tiles = [query, *matches]
    t = query.shape[0]
    head = _CAPTION_H if title else 0
    width = len(tiles) * (t + _PAD) + _PAD + (_PAD if matches else 0)
    canvas = Image.new("RGB", (width, head + t + _CAPTION_H + _PAD), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = caption_font()
    if title:
        draw.text((_PAD, 8), drawable(title), fill=(0, 0, 0), font=font)
    chars = max(8, t // 6)
    x = _PAD
    for i, (tile, label) in enumerate(zip(tiles, [query_label, *labels])):
        if i == 1:
            x += _PAD  # a gap between the query and its matches
            draw.line([(x - _PAD, head), (x - _PAD, head + t)], fill=(180, 180, 180), width=1)
        canvas.paste(Image.fromarray(tile), (x, head))
        color = (200, 0, 0) if i == 0 else (0, 0, 0)
        for line_no, part in enumerate(label.split("\n")[:2]):
            draw.text((x, head + t + 2 + 12 * line_no), fit_text(part, chars), fill=color, font=font)
        x += t + _PAD
    return canvas


def neighbour_tiles(
    indices: Sequence[int], distances: Sequence[float], tile: Callable[[int], np.ndarray], names: Sequence[str]
) -> tuple[list[np.ndarray], list[str]]:
    """One query's neighbours as composite tiles and captions ("d=0.123" over the file name).

    Args:
        indices, distances: one row of a Neighbours result (slots of -1 are skipped).
        tile: gallery row -> uint8 (T, T, 3) thumbnail.
        names: gallery row -> file name.
    """
    tiles, labels = [], []
    for j, d in zip(indices, distances):
        if j < 0:
            continue
        tiles.append(tile(int(j)))
        labels.append(f"d={d:.3f}\n{names[int(j)]}")
    return tiles, labels


def save_jpeg(image: Image.Image, path: str | Path, quality: int = 90) -> None:
    atomic_write_bytes(path, encode_jpeg(image, quality=quality))


# ----------------------------------------------------------------------------- matplotlib figures
def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def order_for_heatmap(embeddings: np.ndarray, seed: int = 0) -> np.ndarray:
    """A 1-D ordering that puts similar rows together: k-means clusters ordered by the leaves of a
    hierarchical clustering of their centroids, rows within a cluster by distance to the centroid.

    Returns:
        int64 permutation of range(N).
    """
    from scipy.cluster.hierarchy import leaves_list, linkage
    from scipy.cluster.vq import kmeans2

    n = embeddings.shape[0]
    if n < 3:
        return np.arange(n)
    k = int(min(max(2, np.sqrt(n) / 2), 64, n - 1))
    rng = np.random.default_rng(seed)
    sample = embeddings[rng.choice(n, size=min(n, 5000), replace=False)].astype(np.float64)
    centroids, _ = kmeans2(sample, k, minit="++", seed=seed)
    d = 1.0 - embeddings.astype(np.float64) @ centroids.T
    labels = d.argmin(axis=1)
    leaf_rank = np.empty(k, dtype=np.int64)
    leaf_rank[leaves_list(linkage(centroids, method="average", metric="cosine"))] = np.arange(k)
    return np.lexsort((np.arange(n), d[np.arange(n), labels], leaf_rank[labels]))


def block_mean_distances(embeddings: np.ndarray, order: np.ndarray, cells: int) -> np.ndarray:
    """Mean cosine distance over cells x cells blocks of the N x N matrix, rows/columns in `order`.

    Exact without forming the matrix: for normalized rows, the mean of 1 - a·b over blocks A x B is
    1 - (sum A)·(sum B) / (|A| |B|).

    Returns:
        float64 (cells, cells) with cells = min(cells, N).
    """
    n = embeddings.shape[0]
    cells = min(cells, n)
    edges = np.linspace(0, n, cells + 1).astype(np.int64)
    sums = np.add.reduceat(embeddings[order].astype(np.float64), edges[:-1], axis=0)
    counts = np.diff(edges).astype(np.float64)
    return 1.0 - (sums @ sums.T) / np.outer(counts, counts)


def save_heatmap(embeddings: np.ndarray, path: str | Path, cells: int = 500, title: str = "") -> None:
    """Heatmap of the cosine distance matrix, rows ordered by `order_for_heatmap`, block-averaged
    to at most `cells` x `cells` so it stays readable for 10^4+ rows."""
    n = embeddings.shape[0]
    e = np.ascontiguousarray(embeddings, dtype=np.float32)
    order = order_for_heatmap(e)
    grid = block_mean_distances(e, order, cells)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 7), dpi=110)
    im = ax.imshow(grid, cmap="viridis", interpolation="nearest", extent=(0, n, n, 0))
    fig.colorbar(im, ax=ax, label="cosine distance")
    ax.set_xlabel("item (clustered order)")
    ax.set_ylabel("item (clustered order)")
    avg = "" if cells >= n else f", {int(np.ceil(n / cells))}x{int(np.ceil(n / cells))} block means"
    ax.set_title(title or f"Cosine distance matrix, {n} items{avg}")
    fig.tight_layout()
    save_figure(fig, path)


def save_histogram(values: np.ndarray, path: str | Path, title: str, xlabel: str = "cosine distance") -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    finite = values[np.isfinite(values)]
    ax.hist(finite, bins=min(100, max(10, len(finite) // 20)), color="#3b75af")
    if len(finite):
        ax.axvline(float(np.median(finite)), color="k", ls="--", lw=1, label=f"median {np.median(finite):.3f}")
        ax.legend()
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    ax.set_title(title)
    fig.tight_layout()
    save_figure(fig, path)


def save_figure(fig, path: str | Path) -> None:
    import io

    plt = pyplot()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
