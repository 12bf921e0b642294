"""Pictures: thumbnails, result composites (query + top-k, drawn with PIL from thumbnails made once),
the distance-matrix heatmap and the nearest-neighbour histogram (matplotlib, Agg).

Captions are drawn in DejaVu Sans, the TrueType font matplotlib ships (a dependency already), at a
size that follows the tiles; each distinct caption is rendered once and pasted after that, which
keeps 10,000 composites of a dozen captions each as cheap as a bitmap font.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .fileio import atomic_write_bytes
from .images import encode_jpeg

THUMB_SIZE = 128  # the store's thumbnails (thumbnails.npy), and so the gallery pictures' tiles
_PAD = 6
_TILE_EDGE = (222, 226, 232)
MAX_TITLE_PX = 960  # the most a row is widened for its title
_QUERY_INK = (31, 82, 180)  # the pages' accent, darker: red read as an error
_INK = (20, 24, 30)
_MUTED_INK = (90, 98, 112)

Font = ImageFont.FreeTypeFont | ImageFont.ImageFont


def make_thumbnail(image: Image.Image, size: int = THUMB_SIZE) -> np.ndarray:
    """Fit an RGB image into a size x size white square, keeping its aspect: uint8 (size, size, 3)."""
    im = image.copy()
    im.thumbnail((size, size), Image.Resampling.BILINEAR, reducing_gap=2.0)
    canvas = Image.new("RGB", (size, size), (255, 255, 255))
    canvas.paste(im, ((size - im.width) // 2, (size - im.height) // 2))
    return np.asarray(canvas)


@lru_cache(maxsize=2)
def font_file(bold: bool = False) -> str | None:
    """DejaVu Sans (bold) from matplotlib's data folder: Latin, Greek, Cyrillic, Arabic, Hebrew and
    more; None when it is not there."""
    try:
        import matplotlib
    except ImportError:  # pragma: no cover - a dependency; Pillow's own font stands in
        return None
    path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / ("DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf")
    return str(path) if path.is_file() else None


@lru_cache(maxsize=16)
def caption_font(size: int = 12, bold: bool = False) -> Font:
    """The captions' TrueType font at `size` pixels; without DejaVu, Pillow's own TrueType font."""
    path = font_file(bold)
    return ImageFont.truetype(path, size) if path else ImageFont.load_default(size)


@lru_cache(maxsize=2)
def _glyphs(bold: bool) -> frozenset[int] | None:
    """The code points the caption font has glyphs for; None when unknown (Pillow's font)."""
    path = font_file(bold)
    if path is None:
        return None
    from matplotlib.ft2font import FT2Font

    return frozenset(FT2Font(path).get_charmap())


def drawable(text: str, bold: bool = False) -> str:
    """Text the caption font can draw: a character it has no glyph for (a CJK file name or query
    with DejaVu; anything past Latin-1 with Pillow's font) becomes '?', not an empty box."""
    glyphs = _glyphs(bold)
    if glyphs is None:
        return text.encode("latin-1", "replace").decode("latin-1")
    return "".join(c if ord(c) in glyphs or c.isspace() else "?" for c in text)


def fit_text(text: str, width_px: int, size: int = 12, bold: bool = False) -> str:
    """The caption as drawn in `width_px` pixels: whole, or its end after '…' (names differ at the end)."""
    text = drawable(text, bold)
    font = caption_font(size, bold)
    if font.getlength(text) <= width_px:
        return text
    lo, hi = 0, len(text)  # the most trailing characters that fit after the ellipsis
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if font.getlength("…" + text[len(text) - mid :]) <= width_px:
            lo = mid
        else:
            hi = mid - 1
    return "…" + text[len(text) - lo :] if lo else "…"


@lru_cache(maxsize=16384)
def _caption_mask(text: str, width_px: int, size: int, bold: bool) -> Image.Image:
    """A caption rendered once as an 8-bit coverage mask (fitted to width_px), to paste in any colour."""
    font = caption_font(size, bold)
    fitted = fit_text(text, width_px, size, bold)
    ascent, descent = font.getmetrics() if isinstance(font, ImageFont.FreeTypeFont) else (size, size // 4)
    mask = Image.new("L", (max(1, min(width_px, int(font.getlength(fitted)) + 2)), ascent + descent), 0)
    ImageDraw.Draw(mask).text((0, 0), fitted, fill=255, font=font)
    return mask


def draw_caption(
    canvas: Image.Image, xy: tuple[int, int], text: str, width_px: int, size: int,
    colour: tuple[int, int, int] = _INK, bold: bool = False,
) -> None:
    """Draw one line of text at xy (its top left), cut to width_px from the left with '…'."""
    mask = _caption_mask(text, width_px, size, bold)
    canvas.paste(colour, (xy[0], xy[1], xy[0] + mask.width, xy[1] + mask.height), mask)


def caption_size(tile: int) -> int:
    """Caption font size in pixels for tiles of `tile` pixels: 12 at 128, 15 at 224."""
    return max(11, round(8 + tile / 32))


def text_tile(text: str, size: int = THUMB_SIZE) -> np.ndarray:
    """A white tile with a text query written on it, wrapped to the tile: uint8 (size, size, 3)."""
    im = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(im)
    draw.rectangle([0, 0, size - 1, size - 1], outline=(170, 176, 186))
    font_px = round(caption_size(size) * 1.2)
    font, inner = caption_font(font_px), size - 16
    lines: list[str] = []
    for word in drawable(text).split():
        if lines and font.getlength(lines[-1] + " " + word) <= inner:
            lines[-1] += " " + word
        else:
            lines.append(word)
    step = round(font_px * 1.3)
    shown = max(1, (size - 16) // step)
    if len(lines) > shown:
        lines = lines[: shown - 1] + [lines[shown - 1] + " …"]
    for i, line in enumerate(lines):
        draw_caption(im, (8, 8 + step * i), line, inner, font_px)
    return np.asarray(im)


def compose_matches(
    query: np.ndarray,
    query_label: str,
    matches: Sequence[np.ndarray],
    labels: Sequence[str],
    title: str = "",
    first_is_query: bool = True,
) -> Image.Image:
    """One row: the query tile, then each match tile with its caption (e.g. "d=0.123" over
    "img_3f2a9c1e0b4d5a6f.jpg"), in a TrueType font sized to the tiles; the row is as wide as its
    title at least (a title is not cut to one tile's width).

    Args:
        query: uint8 (T, T, 3) RGB tile; T sets the size of every tile and of the text.
        matches: uint8 RGB tiles, best first (resized to T x T if they are another size).
        labels: one caption per match: up to two lines, the first drawn darker.
        title: a line above the row (bold), or nothing.
        first_is_query: the first tile set apart (its caption in the query's colour, a rule after
            it); False for a row of equals (a person's crops over time).
    """
    t = query.shape[0]
    tiles = [query, *(m if m.shape[:2] == (t, t) else _resized(m, t) for m in matches)]
    size = caption_size(t)
    line_h = round(size * 1.35)
    top = (round(line_h * 1.5) if title else 0) + 2  # the tiles' top edge
    gap = 2 * _PAD if matches and first_is_query else 0
    width = len(tiles) * (t + _PAD) + _PAD + gap
    if title:  # as wide as the title, up to MAX_TITLE_PX (a product description as a query is cut, not a banner)
        needed = int(caption_font(size + 1, True).getlength(drawable(title, True))) + 2 * _PAD + 2
        width = max(width, min(needed, MAX_TITLE_PX))
    canvas = Image.new("RGB", (width, top + t + 4 + 2 * line_h + _PAD), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    if title:
        draw_caption(canvas, (_PAD, round(line_h * 0.3)), title, width - 2 * _PAD, size + 1, _INK, bold=True)
    x = _PAD
    for i, (tile, label) in enumerate(zip(tiles, [query_label, *labels])):
        if i == 1 and first_is_query:
            x += 2 * _PAD  # a gap, with a rule, between the query and its matches
            draw.line([(x - _PAD - 4, top), (x - _PAD - 4, top + t)], fill=(170, 176, 186), width=1)
        draw.rectangle([x - 1, top - 1, x + t, top + t], outline=_TILE_EDGE)  # white tiles show their edge
        canvas.paste(Image.fromarray(tile), (x, top))
        for line_no, part in enumerate(label.split("\n")[:2]):
            colour = _QUERY_INK if i == 0 and first_is_query else (_INK if line_no == 0 else _MUTED_INK)
            draw_caption(canvas, (x, top + t + 4 + line_h * line_no), part, t, size, colour, bold=line_no == 0)
        x += t + _PAD
    return canvas


def _resized(tile: np.ndarray, t: int) -> np.ndarray:
    return np.asarray(Image.fromarray(tile).resize((t, t), Image.Resampling.LANCZOS))


def neighbour_labels(
    indices: Sequence[int], distances: Sequence[float], names: Sequence[str] | Mapping[int, str]
) -> tuple[list[int], list[str]]:
    """One query's neighbours as gallery rows and captions ("d=0.123" over the file name).

    Args:
        indices, distances: one row of a Neighbours result (slots of -1 are skipped).
        names: gallery row -> its caption (store.shown_name: what the user knows the photo by), a
            list or a mapping of the rows shown.
    """
    rows, labels = [], []
    for j, d in zip(indices, distances):
        if j < 0:
            continue
        rows.append(int(j))
        labels.append(f"d={d:.3f}\n{names[int(j)]}")
    return rows, labels


def neighbour_tiles(
    indices: Sequence[int], distances: Sequence[float], tile: Callable[[int], np.ndarray],
    names: Sequence[str] | Mapping[int, str],
) -> tuple[list[np.ndarray], list[str]]:
    """neighbour_labels with each row's tile (tile: gallery row -> uint8 (T, T, 3) thumbnail)."""
    rows, labels = neighbour_labels(indices, distances, names)
    return [tile(j) for j in rows], labels


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
    # 2,000 rows are 30+ per cluster, enough to place the centroids (k-means++ on 5,000 took 2.1 s of a
    # 10,000-item run).
    sample = embeddings[rng.choice(n, size=min(n, 2000), replace=False)].astype(np.float64)
    centroids, _ = kmeans2(sample, kmeans_pp_seeds(sample, k, rng), minit="matrix")
    d = 1.0 - embeddings.astype(np.float64) @ centroids.T
    labels = d.argmin(axis=1)
    leaf_rank = np.empty(k, dtype=np.int64)
    leaf_rank[leaves_list(linkage(centroids, method="average", metric="cosine"))] = np.arange(k)
    return np.lexsort((np.arange(n), d[np.arange(n), labels], leaf_rank[labels]))


def kmeans_pp_seeds(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeds: each next seed drawn with probability proportional to its squared distance
    to the nearest seed so far, kept up to date one seed at a time (scipy's minit="++" measures
    every row against all seeds again at each step: 0.37 s for 50 seeds on 2,000 rows, this 0.03 s)."""
    seeds = np.empty((k, x.shape[1]), dtype=x.dtype)
    seeds[0] = x[rng.integers(len(x))]
    d2 = ((x - seeds[0]) ** 2).sum(axis=1)
    for j in range(1, k):
        total = d2.sum()
        i = rng.choice(len(x), p=d2 / total) if total > 0 else rng.integers(len(x))
        seeds[j] = x[i]
        np.minimum(d2, ((x - seeds[j]) ** 2).sum(axis=1), out=d2)
    return seeds


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
    ax.set_xlabel("items, similar ones side by side (positions in that order, not rows)")
    ax.set_ylabel("items, in the same order")
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
        # 3 significant digits: a catalogue of near copies has a median of ~1e-4, which .3f showed as 0.000
        ax.axvline(float(np.median(finite)), color="k", ls="--", lw=1, label=f"median {np.median(finite):.3g}")
        ax.legend()
    # distances of near copies (~1e-4) as 0.4, 0.8 ... with a x10^-4 beside the axis: written out,
    # seven-digit ticks ran into each other
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(nbins=6))
    ax.ticklabel_format(axis="x", style="sci", scilimits=(-2, 4), useMathText=True)
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
