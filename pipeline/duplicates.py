"""Duplicates: exact copies (the same decoded pixels) and near copies (the same photo re-encoded,
resized, cropped a few per cent, lightly colour-shifted) among a gallery's photos, found without
comparing every pair, for outputs/duplicates.csv. Nothing here depends on the embedding model.

Per photo, computed once when it is decoded (`PhotoSignals` holds N of them):

- `pixel_hash(rgb, full_size) -> str`: sha256 of the decoded pixels and their shape, 32 hex
  digits; equal means an exact copy. The pipeline hashes the pixels it decodes for the model: a
  large JPEG at a reduced DCT scale (with its full size in the hash), which two JPEG files holding
  the same picture share whatever their metadata, for a fraction of a second full decode. A JPEG
  and a PNG of its full-size pixels are decoded differently and so are found as a near copy at a
  small distance, not an exact one.
- `look_signature(image) -> int8 (SIGNATURE_SIZE,)`: the photo at a coarse scale, in four parts:
  structure (the 35 lowest 2-D DCT frequencies of its 32x32 luminance, borders faded, unit length),
  colour (log chroma and lightness of 3x3 soft cells relative to the photo's mean, so a white
  balance or brightness change of the whole photo cancels), texture (vertical and horizontal
  detail of the same cells at 128 px, relative to the photo's mean detail) and centre (log chroma
  and lightness of a window a fifth of each side wide around the middle, where a catalogue photo
  has its product, relative to the same mean: a colourway moves it all, a crop of a few per cent
  barely). `signature_text` and `signatures_from_text` store it in a CSV column (112 characters).
  A grey-level 64-bit pHash or dHash cannot be the decision: it does not see a garment's
  colourway, nor a print of one colour (benchmarks/duplicates.py measures both beside this rule).

Finding (`find_duplicates` for a build), cheapest signal first, no step over all pairs:

1. exact: equal pixel hashes are grouped (one sort); only the first photo of each set goes on;
2. hashes: `HashCoder` turns signatures into 64-bit SimHash codes (64 fixed random projections,
   each cut at the gallery's median), so close signatures have close codes;
3. near candidates, multi-index hashing (`DuplicateIndex`): each of TABLES tables cuts a fixed
   permutation of the 64 bits into BANDS bands of 16; photos sharing a band value are candidates.
   By the pigeonhole principle a pair within Hamming distance 3 always shares a band of the first
   table; farther ones share one with a probability the benchmark measures. Random codes collide
   in a band with probability 2^-16: about TABLES * BANDS * N^2 / 2^17 pairs (6 * 10^7 at 1M),
   generated and filtered a step at a time; a photo meets at most `max_bucket` others of one bucket,
   so even a gallery of identical codes costs linear work;
4. optionally the embedding index's top-k neighbours (`neighbour_pairs`) as more candidates;
5. each candidate is confirmed by its Hamming distance (<= rule.max_bits, a cheap filter) and then
   by the signature rule (`NearRule`): each part's RMS difference within its calibrated bound (the
   centre part is in the rule, not in the hash codes). The
   embedding only proposes pairs and never accepts one, so precision does not depend on the model;
6. groups: connected components over the confirmed pairs (union-find). A group's first photo
   (lowest position) represents it.

`distance` in the results: 0 for an exact copy; for a near copy the signature distance to the
group's first photo, normalised: the largest of the four parts' RMS differences, each divided by
its bound (1.0 is the edge of the rule; a member joined through another member may be above 1).

Updates: `check_new(index, new)` checks new photos against the kept gallery's `DuplicateIndex`
(its band tables probed with its coder, nothing rebuilt) and against each other; `update_groups`
turns the previous groups (`renumber_groups`) and those pairs into the groups a fresh run with the
same coder finds.

Results: `DuplicateGroup` lists; `write_duplicates_csv(path, groups, source_rows, files, sources)`
writes group, source_row, file, kind, distance, source atomically; `representatives(groups, n)` and
`keep_one_per_group` keep one photo per group in a top-k result (--dedup).

In the pipeline: `item_signals` per item as it is decoded (manifest columns pixel_hash and look),
`gallery_duplicates` over a store's lines, `write_groups`/`read_groups` beside the store.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from .fileio import atomic_write_text
from .images import rgb_array

log = logging.getLogger(__name__)

SIGNATURE_VERSION = "look-4"  # changes whenever a signature or hash of the same picture would change
STRUCTURE_COEFFS = 35  # DCT coefficients with u + v <= 7, minus the mean
GRID = 3  # cells per side
COLOUR_SIZE = 3 * GRID * GRID  # log R/G, log RG/B, log lightness per cell
TEXTURE_SIZE = 2 * GRID * GRID  # vertical and horizontal detail per cell
CENTRE_SIZE = 3  # log R/G, log RG/B, log lightness of the photo's centre
SIGNATURE_SIZE = STRUCTURE_COEFFS + COLOUR_SIZE + TEXTURE_SIZE + CENTRE_SIZE
PARTS = {
    "structure": slice(0, STRUCTURE_COEFFS),
    "colour": slice(STRUCTURE_COEFFS, STRUCTURE_COEFFS + COLOUR_SIZE),
    "texture": slice(STRUCTURE_COEFFS + COLOUR_SIZE, STRUCTURE_COEFFS + COLOUR_SIZE + TEXTURE_SIZE),
    "centre": slice(STRUCTURE_COEFFS + COLOUR_SIZE + TEXTURE_SIZE, SIGNATURE_SIZE),
}
# int8 units per signature unit, per part: structure components lie in [-1, 1]; log colour ratios
# in about [-2, 2]; log texture ratios in [log 0.02, ~3].
_SCALE = np.concatenate(
    [np.full(STRUCTURE_COEFFS, 127.0), np.full(COLOUR_SIZE, 64.0), np.full(TEXTURE_SIZE, 32.0),
     np.full(CENTRE_SIZE, 64.0)]
).astype(np.float32)
_WORK_SIDE = 128  # the photo is reduced once to this square; everything is computed from it
# look-4's reduction: bicubic after an integer box reduction while the factor stays >= 2 (0.9-1.0 ms
# less per 768x1024 photo's 384x512 decode than look-3's Lanczos with reducing_gap=3, which does no
# integer reduction at a factor of 3-4; the signature 1.1 ms less with the mean below), with the same
# recall and precision in benchmarks/duplicates.py; the box reduction alone and bilinear found fewer
# of the 5% crops (README, "Duplicates").
_REDUCE_FILTER, _REDUCE_GAP = Image.Resampling.BICUBIC, 2.0
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)
_CELL_SIGMA = 0.6  # soft cells: Gaussian weights, this many cell widths wide, so a crop moves no edge
_CENTRE_SIGMA = 0.1  # the centre part's Gaussian window, this share of each side wide
_FADE = 0.15  # share of each side over which the structure part fades the picture to its mean
_TEXTURE_FLOOR = 0.02  # a flat cell's detail: keeps the log finite and a blank cell's noise out
_ZIGZAG = sorted(((u, v) for u in range(8) for v in range(8)), key=lambda t: (t[0] + t[1], t[0]))[
    1 : STRUCTURE_COEFFS + 1
]

BANDS = 4  # bands of 16 bits in each table
TABLES = 2  # the first table keeps the bit order (the pigeonhole guarantee), the others permute it
_HASH_SEED = 20261203  # the projections and permutations: fixed forever for one SIGNATURE_VERSION
FIT_CELL = 8  # signature units a side of the cells HashCoder.fit counts each look once in
# The parts the hash codes are made of. The centre part only confirms: three values under a tight
# bound would take over every projection (each bit then a function of three numbers, so codes of
# unrelated photos collide), and leaving a filter out of the hash loses no pair the rule accepts.
HASHED_PARTS = ("structure", "colour", "texture")


def pixel_hash(rgb: np.ndarray, full_size: tuple[int, int] | None = None) -> str:
    """sha256 of a decoded photo's pixels and shape, first 32 hex digits (128 bits).

    Args:
        rgb: uint8 (H, W, 3), RGB order.
        full_size: (width, height) of the photo when `rgb` is a decode at a reduced scale (a JPEG's
            DCT scaling): part of the hash, so that a reduced decode never equals a full one.
    """
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"rgb must be a uint8 array of shape (H, W, 3), but got {rgb.dtype} {rgb.shape}")
    reduced = full_size is not None and tuple(full_size) != (rgb.shape[1], rgb.shape[0])
    scale = f" of {full_size[0]}x{full_size[1]}" if reduced and full_size is not None else ""
    h = hashlib.sha256(f"{rgb.shape[0]}x{rgb.shape[1]}x3{scale}:".encode("ascii"))
    h.update(np.ascontiguousarray(rgb).data)
    return h.hexdigest()[:32]


@lru_cache(maxsize=4)
def _soft_cells(n: int) -> np.ndarray:
    """float32 (GRID, n): each cell's Gaussian weights along one side of n pixels, summing to 1."""
    return _gaussian_weights(n, (np.arange(GRID) + 0.5) / GRID, _CELL_SIGMA / GRID)


def _gaussian_weights(n: int, centres: np.ndarray, sigma: float) -> np.ndarray:
    """float32 (len(centres), n), read-only: Gaussian weights of width `sigma` (a share of the side)
    around each centre (a position in [0, 1]) along a side of n pixels, each row summing to 1."""
    x = (np.arange(n) + 0.5) / n
    w = np.exp(-0.5 * ((x[None, :] - centres[:, None]) / sigma) ** 2)
    weights = (w / w.sum(axis=1, keepdims=True)).astype(np.float32)
    weights.flags.writeable = False
    return weights


def _cells(values: np.ndarray) -> np.ndarray:
    """(H, W) or (H, W, C) -> (GRID * GRID,) or (GRID * GRID, C): weighted means of the soft cells."""
    wy, wx = _soft_cells(values.shape[0]), _soft_cells(values.shape[1])
    rows = np.tensordot(wy, values, axes=(1, 0))  # (GRID, W, ...)
    out = np.moveaxis(np.tensordot(rows, wx, axes=(1, 1)), -1, 1)  # (GRID, GRID, ...)
    return out.reshape(GRID * GRID, *values.shape[2:])


def _structure(luma: np.ndarray) -> np.ndarray:
    from scipy.fft import dctn  # here: scipy.fft costs 0.2-0.5 s to import, and a run that signs no photo needs none

    small = luma.reshape(32, _WORK_SIDE // 32, 32, _WORK_SIDE // 32).mean(axis=(1, 3))
    t = (np.arange(32) + 0.5) / 32
    fade = np.clip(np.minimum(t, 1 - t) / _FADE, 0, 1)
    w = np.outer(fade, fade)
    small = small * w + (1 - w) * small.mean()  # what a crop cuts away counts least
    c = dctn(small, type=2, norm="ortho")
    v = np.array([c[u, k] for u, k in _ZIGZAG], np.float32)
    return v / max(float(np.linalg.norm(v)), 1e-6)  # a flat picture: all zeros


_ONES = np.ones(_WORK_SIDE * _WORK_SIDE, np.float32)


def _log_colour(rgb: np.ndarray) -> np.ndarray:
    """Each pixel's log colour relative to the photo's mean (grey-world: a gain per channel cancels).
    The mean is a product with ones (BLAS; numpy's mean over an axis of 3 takes 0.2 ms here): the
    same float32 value whatever the order, as every partial sum of 128 x 128 8-bit levels is an
    integer under 2^24, and the count a power of two."""
    mean = _ONES @ rgb.reshape(-1, 3) / np.float32(_ONES.size) + np.float32(1.0)
    return np.log((rgb + 1.0) / mean)


def _colour(logs: np.ndarray) -> np.ndarray:
    cells = _cells(logs)
    return np.concatenate([cells[:, 0] - cells[:, 1], (cells[:, 0] + cells[:, 1]) / 2 - cells[:, 2],
                           cells.mean(axis=1)])


@lru_cache(maxsize=4)
def _centre_window(n: int) -> np.ndarray:
    """float32 (n,): Gaussian weights around the middle of a side of n pixels, summing to 1."""
    return _gaussian_weights(n, np.array([0.5]), _CENTRE_SIGMA)[0]


def _centre(logs: np.ndarray) -> np.ndarray:
    """The colour of the photo's middle (where a catalogue photo has its product) relative to the
    whole photo's mean: a window a fifth of each side wide, so a crop of a few per cent barely moves
    it, while a garment in another colourway moves it all (the soft cells average the garment with
    its background, and grey-world then takes back most of what it changed)."""
    wy, wx = _centre_window(logs.shape[0]), _centre_window(logs.shape[1])
    c = np.tensordot(wx, np.tensordot(wy, logs, axes=(0, 0)), axes=(0, 0))  # (3,)
    return np.array([c[0] - c[1], (c[0] + c[1]) / 2 - c[2], c.mean()], np.float32)


def _texture(luma: np.ndarray) -> np.ndarray:
    dy, dx = np.abs(np.diff(luma, axis=0)), np.abs(np.diff(luma, axis=1))
    total = (dy.mean() + dx.mean()) / 2 + 1e-3
    return np.log(np.concatenate([_cells(dy), _cells(dx)]) / total + _TEXTURE_FLOOR)


def look_signature(image: Image.Image) -> np.ndarray:
    """int8 (SIGNATURE_SIZE,): structure, colour, texture and centre of the photo at a coarse scale
    (see the module docstring). Independent of the photo's size and of its encoding."""
    rgb_image = image if image.mode == "RGB" else image.convert("RGB")
    small = rgb_image.resize((_WORK_SIDE, _WORK_SIDE), _REDUCE_FILTER, reducing_gap=_REDUCE_GAP)
    rgb = np.asarray(small, np.float32)
    luma, logs = rgb @ _LUMA, _log_colour(rgb)
    values = np.concatenate([_structure(luma), _colour(logs), _texture(luma), _centre(logs)])
    return np.clip(np.round(values * _SCALE), -127, 127).astype(np.int8)


def signature_text(signature: np.ndarray) -> str:
    """A signature as text for a CSV column (base64, 112 characters)."""
    return base64.b64encode(_check_signatures(signature[None, :])[0].tobytes()).decode("ascii")


def signatures_from_text(texts: Sequence[str]) -> np.ndarray:
    """int8 (N, SIGNATURE_SIZE) from `signature_text` strings."""
    raw = b"".join(base64.b64decode(t) for t in texts)
    if len(raw) != SIGNATURE_SIZE * len(texts):
        raise ValueError(f"signatures must decode to {SIGNATURE_SIZE} bytes each ({SIGNATURE_VERSION})")
    return np.frombuffer(raw, np.int8).reshape(len(texts), SIGNATURE_SIZE).copy()


def _check_signatures(signatures: np.ndarray) -> np.ndarray:
    sig = np.asarray(signatures)
    if sig.dtype != np.int8 or sig.ndim != 2 or sig.shape[1] != SIGNATURE_SIZE:
        raise ValueError(f"signatures must be int8 (N, {SIGNATURE_SIZE}), but got {sig.dtype} {sig.shape}")
    return sig


@dataclass(frozen=True)
class NearRule:
    """When two photos are near copies: each part's RMS signature difference (in signature units)
    at most its bound, and their hashes at most max_bits apart (a cheap first filter). Calibrated by
    benchmarks/duplicates.py on generated copies and look-alikes."""

    structure: float
    colour: float
    texture: float
    centre: float
    max_bits: int

    def bound(self, part: str) -> float:
        return float(getattr(self, part))


DEFAULT_RULE = NearRule(structure=0.042, colour=0.033, texture=0.046, centre=0.030, max_bits=9)


def signature_distances(a: np.ndarray, b: np.ndarray, rule: NearRule = DEFAULT_RULE) -> np.ndarray:
    """float32 (N,): for signature rows a[i], b[i] (int8 (N, SIGNATURE_SIZE)), the largest of the
    parts' RMS differences each divided by its bound: <= 1 passes the rule."""
    diff = (a.astype(np.int16) - b.astype(np.int16)).astype(np.float32)
    squares = diff * diff  # exact in float32: at most 254^2 each, sums below 2^24
    per_part = squares @ _part_weights(rule)  # (N, parts): each part's mean square over its bound squared
    return np.sqrt(per_part.max(axis=1)) if len(per_part) else np.zeros(0, np.float32)


def _part_weights(rule: NearRule) -> np.ndarray:
    """float32 (SIGNATURE_SIZE, len(PARTS)): column p sums part p's squared differences into its mean
    square in signature units over its bound squared."""
    w = np.zeros((SIGNATURE_SIZE, len(PARTS)), np.float32)
    for column, (name, part) in enumerate(PARTS.items()):
        w[part, column] = 1.0 / (_SCALE[part] ** 2 * (part.stop - part.start) * rule.bound(name) ** 2)
    return w


@dataclass(frozen=True)
class PhotoSignals:
    """The duplicate signals of N photos, row i = photo position i.

    pixel: str (N,), the pixel hashes ("" for a photo without one: never an exact copy).
    signature: int8 (N, SIGNATURE_SIZE), the look signatures.
    """

    pixel: np.ndarray
    signature: np.ndarray

    def __post_init__(self) -> None:
        object.__setattr__(self, "pixel", np.asarray(self.pixel, dtype=str))
        _check_signatures(self.signature)
        if self.pixel.shape != (len(self.signature),):
            raise ValueError(
                f"pixel {self.pixel.shape} and signature {self.signature.shape} must have one row a photo"
            )

    def __len__(self) -> int:
        return len(self.signature)

    @classmethod
    def of_images(cls, images: Sequence[Image.Image]) -> PhotoSignals:
        """Signals of decoded photos (tests and benchmarks: the pipeline computes them per photo as
        it decodes, and reads them back from the manifest)."""
        sig = np.stack([look_signature(im) for im in images]) if images else np.zeros((0, SIGNATURE_SIZE), np.int8)
        return cls(np.array([pixel_hash(np.asarray(im.convert("RGB"))) for im in images], dtype=str), sig)

    def take(self, rows: np.ndarray) -> PhotoSignals:
        return PhotoSignals(self.pixel[rows], self.signature[rows])

    def concat(self, other: PhotoSignals) -> PhotoSignals:
        pixel = np.concatenate([self.pixel, other.pixel])
        return PhotoSignals(pixel, np.concatenate([self.signature, other.signature]))


@dataclass(frozen=True)
class HashCoder:
    """Turns look signatures into 64-bit hashes (SimHash): bit k says whether the signature's
    projection on a fixed random direction k lies above thresholds[k]. The directions weight each
    part by one over its bound and its length, so a part counts in the hash as in the rule (the
    centre part not at all: HASHED_PARTS); the
    thresholds are the medians of the gallery's distinct looks (`fit`), so every bit splits the
    gallery in half even when its photos share a composition (on catalogue-like photos zero
    thresholds put ~half of all pairs in a common bucket)."""

    thresholds: np.ndarray  # float32 (64,)
    rule: NearRule = field(default_factory=lambda: DEFAULT_RULE)

    @classmethod
    def fit(cls, signatures: np.ndarray, rule: NearRule | None = None, sample: int = 100_000) -> HashCoder:
        """Median thresholds over (an evenly spaced sample of) the gallery's signatures, one per
        coarse cell of the hashed parts' space (HASHED_PARTS, FIT_CELL units a side): a picture
        present thousands of times (a placeholder re-encoded per product) would otherwise put the
        medians among its own copies, whose codes then differ at random (measured: 2,880 re-encodes
        of one photo beside 1,440 others fell into 28 groups; counted once per cell, one group)."""
        rule = rule or DEFAULT_RULE
        sig = _check_signatures(signatures)
        if len(sig) == 0:
            return cls(np.zeros(64, np.float32), rule)
        sampled = sig[:: max(1, len(sig) // sample)]
        hashed = np.r_[tuple(PARTS[name] for name in HASHED_PARTS)]  # looks equal where the codes see them
        distinct = np.sort(np.unique(sampled[:, hashed] // FIT_CELL, axis=0, return_index=True)[1])
        return cls(np.median(_project(sampled[distinct], rule), axis=0).astype(np.float32), rule)

    def codes(self, signatures: np.ndarray) -> np.ndarray:
        """uint64 (N,) for int8 (N, SIGNATURE_SIZE) signatures."""
        sig = _check_signatures(signatures)
        out = np.empty(len(sig), np.uint64)
        for s in range(0, len(sig), 1 << 18):
            out[s : s + (1 << 18)] = _pack_bits(_project(sig[s : s + (1 << 18)], self.rule) > self.thresholds)
        return out


def _project(signatures: np.ndarray, rule: NearRule) -> np.ndarray:
    """float32 (N, 64): the signatures on the coder's 64 fixed random directions."""
    planes = np.random.default_rng(_HASH_SEED).standard_normal((SIGNATURE_SIZE, 64)).astype(np.float32)
    weight = np.zeros(SIGNATURE_SIZE, np.float32)
    for name in HASHED_PARTS:
        part = PARTS[name]
        weight[part] = 1.0 / (_SCALE[part] * rule.bound(name) * np.sqrt(part.stop - part.start))
    return signatures.astype(np.float32) @ (planes * weight[:, None])


def _pack_bits(bits: np.ndarray) -> np.ndarray:
    """bool (N, 64) -> uint64 (N,), column i = bit i."""
    packed = np.packbits(np.ascontiguousarray(bits), axis=1, bitorder="little")
    return packed.view("<u8").ravel().astype(np.uint64)


def _unpack_bits(codes: np.ndarray) -> np.ndarray:
    """uint64 (N,) -> bool (N, 64), bit i = column i."""
    raw = np.ascontiguousarray(codes, dtype="<u8").view(np.uint8).reshape(-1, 8)
    return np.unpackbits(raw, axis=1, bitorder="little").astype(bool)


@dataclass(frozen=True)
class Pairs:
    """Photo pairs a[i] < b[i] (positions), int64 each; kind "exact" or "near"; distance float32."""

    a: np.ndarray
    b: np.ndarray
    kind: np.ndarray
    distance: np.ndarray

    @classmethod
    def of(cls, a: np.ndarray, b: np.ndarray, kind: str, distance: np.ndarray | None = None) -> Pairs:
        d = np.zeros(len(a), np.float32) if distance is None else distance.astype(np.float32)
        return cls(np.asarray(a, np.int64), np.asarray(b, np.int64), np.full(len(a), kind, dtype="U5"), d)

    def __len__(self) -> int:
        return len(self.a)

    def concat(self, other: Pairs) -> Pairs:
        return Pairs(*(np.concatenate([x, y]) for x, y in zip(self._fields(), other._fields())))

    def _fields(self) -> tuple[np.ndarray, ...]:
        return self.a, self.b, self.kind, self.distance


@dataclass(frozen=True)
class DuplicateGroup:
    """Photos (positions) that are copies of each other; members[0] is the first photo (lowest
    position), which represents the group. kinds[i]: "exact" when members[i] has the first photo's
    pixels, else "near"; the first photo's own kind says whether the group holds an exact copy of
    it. distances[i]: to the first photo (module docstring), 0 for the first photo and exact copies."""

    members: list[int]
    kinds: list[str]
    distances: list[float]


def _bit_permutations(tables: int) -> list[np.ndarray]:
    rng = np.random.default_rng(_HASH_SEED + 1)
    return [np.arange(64)] + [rng.permutation(64) for _ in range(tables - 1)]


def band_keys(codes: np.ndarray, tables: int = TABLES) -> list[np.ndarray]:
    """tables * BANDS arrays of uint16 (N,): the band values of every table (table t: bits
    permuted by its permutation, then cut into BANDS runs of 16)."""
    bits = _unpack_bits(codes)
    keys = []
    for perm in _bit_permutations(tables):
        code = _pack_bits(bits[:, perm])
        for band in range(BANDS):
            keys.append(((code >> np.uint64(16 * band)) & np.uint64(0xFFFF)).astype(np.uint16))
    return keys


def _runs_pairs(sorted_keys: np.ndarray, order: np.ndarray, max_bucket: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Pairs of positions whose keys are equal, from keys sorted by (key, hash), in chunks of at
    most N: step s pairs each photo with the one s places further in its run, up to max_bucket.
    Work and memory are proportional to the pairs of one step, never to all of them."""
    n = len(sorted_keys)
    active = np.nonzero(sorted_keys[1:] == sorted_keys[:-1])[0]
    step = 1
    while active.size and step <= max_bucket:
        yield order[active].astype(np.int64), order[active + step].astype(np.int64)
        nxt = active[active + step + 1 < n]
        active = nxt[sorted_keys[nxt + step + 1] == sorted_keys[nxt]]
        step += 1


class DuplicateIndex:
    """A gallery's signals, their hashes, and band tables over the first photo of each exact-copy
    set. Built once, O(N log N); `candidates` joins the tables with themselves, `probe` looks other
    photos up in them (an update's new photos, hashed by the same coder).

    Args:
        coder: the hash coder; by default fitted on these signatures.
        max_bucket: a photo is paired with at most this many others of one band bucket (those
            nearest in hash order), so that a bucket of thousands costs no quadratic step.
        tables: band tables (TABLES).
    """

    def __init__(self, signals: PhotoSignals, rule: NearRule = DEFAULT_RULE, coder: HashCoder | None = None,
                 max_bucket: int = 256, tables: int = TABLES) -> None:
        self.signals, self.rule, self.max_bucket, self.n_tables = signals, rule, max_bucket, tables
        self.coder = coder or HashCoder.fit(signals.signature, rule)
        self.codes = self.coder.codes(signals.signature)
        self.exact_first = _exact_firsts(signals.pixel)  # (N,) first position with these pixels
        self.firsts = np.nonzero(self.exact_first == np.arange(len(signals)))[0]
        codes = self.codes[self.firsts]
        self.tables = []
        for keys in band_keys(codes, tables):
            order = np.lexsort((codes, keys))  # by key, then by the whole hash (see max_bucket)
            self.tables.append((keys[order], self.firsts[order]))
        self._pixels_sorted = np.argsort(signals.pixel, kind="stable")

    def __len__(self) -> int:
        return len(self.signals)

    def exact_pairs(self) -> Pairs:
        """Each photo with the first photo of its exact-copy set."""
        copies = np.nonzero(self.exact_first != np.arange(len(self)))[0]
        return Pairs.of(self.exact_first[copies], copies, "exact")

    def candidates(self) -> tuple[np.ndarray, np.ndarray]:
        """Candidate near pairs (a < b) among first photos: a band value in common and hashes at
        most rule.max_bits apart. Counted in the log."""
        a_parts, b_parts, raw = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)], 0
        for keys, order in self.tables:
            for a, b in _runs_pairs(keys, order, self.max_bucket):
                raw += len(a)
                keep = _hamming(self.codes[a], self.codes[b]) <= self.rule.max_bits
                a_parts.append(a[keep])
                b_parts.append(b[keep])
        a, b = _unique_pairs(np.concatenate(a_parts), np.concatenate(b_parts))
        log.info("duplicates: %d band collisions, %d candidates within %d bits", raw, len(a), self.rule.max_bits)
        return a, b

    def probe(self, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(query row, gallery position) pairs for query hashes: a band value in common, at most
        rule.max_bits apart."""
        q_parts, g_parts = [], []
        for (keys, order), qkeys in zip(self.tables, band_keys(codes, self.n_tables)):
            lo = np.searchsorted(keys, qkeys, side="left")
            counts = np.minimum(np.searchsorted(keys, qkeys, side="right") - lo, self.max_bucket)
            q = np.repeat(np.arange(len(codes)), counts)
            offsets = np.arange(len(q)) - np.repeat(np.cumsum(counts) - counts, counts)
            g = order[np.repeat(lo, counts) + offsets].astype(np.int64)
            keep = _hamming(codes[q], self.codes[g]) <= self.rule.max_bits
            q_parts.append(q[keep])
            g_parts.append(g[keep])
        n = max(len(self), 1)
        key = _sorted_unique(np.concatenate(q_parts) * n + np.concatenate(g_parts))
        return key // n, key % n

    def exact_matches(self, pixel: np.ndarray) -> np.ndarray:
        """int64 (Q,): the first gallery photo with these pixels, -1 where none."""
        sorted_pixels = self.signals.pixel[self._pixels_sorted]
        at = np.searchsorted(sorted_pixels, pixel)
        found = (at < len(sorted_pixels)) & (pixel != "")
        found[found] = sorted_pixels[at[found]] == pixel[found]
        out = np.full(len(pixel), -1, np.int64)
        out[found] = self.exact_first[self._pixels_sorted[at[found]]]
        return out


def _exact_firsts(pixel: np.ndarray) -> np.ndarray:
    """int64 (N,): for each photo the first position with the same pixel hash (itself if none or
    no hash)."""
    n = len(pixel)
    if n == 0:
        return np.zeros(0, np.int64)
    _, inverse = np.unique(pixel, return_inverse=True)
    first = np.full(inverse.max() + 1, n, np.int64)
    np.minimum.at(first, inverse, np.arange(n))
    out = first[inverse]
    empty = pixel == ""
    out[empty] = np.nonzero(empty)[0]
    return out


def _hamming(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.bitwise_count(np.bitwise_xor(x, y))


def _unique_pairs(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    keep = lo != hi
    if not keep.any():
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    lo, hi = lo[keep], hi[keep]
    width = int(hi.max()) + 1
    key = _sorted_unique(lo * width + hi)
    return key // width, key % width


def _sorted_unique(x: np.ndarray) -> np.ndarray:
    """np.unique by sorting (numpy 2's hash-based unique is several times slower on 10^7 int64)."""
    x = np.sort(x)
    return x[np.r_[True, x[1:] != x[:-1]]] if len(x) else x


def neighbour_pairs(
    indices: np.ndarray, distances: np.ndarray, max_distance: float = np.inf
) -> tuple[np.ndarray, np.ndarray]:
    """Candidate pairs (a < b) from each photo's top-k neighbours, as the Searcher gives them.

    Args:
        indices: int (N, k), gallery positions, -1 where there is none.
        distances: float (N, k), cosine distances; pairs farther than max_distance are left out.
    """
    indices, distances = np.asarray(indices), np.asarray(distances)
    if indices.shape != distances.shape or indices.ndim != 2:
        raise ValueError(f"indices {indices.shape} and distances {distances.shape} must be the same (N, k) shape")
    rows = np.repeat(np.arange(len(indices)), indices.shape[1])
    cols = indices.ravel().astype(np.int64)
    keep = (cols >= 0) & (distances.ravel() <= max_distance)
    return _unique_pairs(rows[keep], cols[keep])


_FLAT_TEXTURE = int(np.round(np.log(_TEXTURE_FLOOR) * _SCALE[PARTS["texture"]][0]))  # no detail in any cell


def flat_pictures(signatures: np.ndarray) -> np.ndarray:
    """bool (N,): signatures of one-colour pictures (every texture cell at its floor: no detail at
    all); their structure is float noise and their colour part grey-world's zero, whatever the colour."""
    return (signatures[:, PARTS["texture"]] == _FLAT_TEXTURE).all(axis=1)


def _confirm(a: tuple[np.ndarray, np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray, np.ndarray],
             rule: NearRule, chunk: int = 1 << 18) -> tuple[np.ndarray, np.ndarray]:
    """(passes, distance) of the near rule for pairs of rows: a and b are (signatures, hashes,
    rows), pair i is a's row a[2][i] with b's row b[2][i]. Pairs whose hashes are more than
    rule.max_bits apart get distance inf, and so do two one-colour pictures: the signature keeps
    no colour of a flat picture (grey-world), so a red and a green swatch sign alike; only their
    pixels, the exact pairs, can join them. Gathered in chunks: memory stays small at any count."""
    (sig_a, codes_a, rows_a), (sig_b, codes_b, rows_b) = a, b
    d = np.empty(len(rows_a), np.float32)
    for s in range(0, len(rows_a), chunk):
        ra, rb = rows_a[s : s + chunk], rows_b[s : s + chunk]
        part = signature_distances(sig_a[ra], sig_b[rb], rule)
        part[_hamming(codes_a[ra], codes_b[rb]) > rule.max_bits] = np.inf
        part[flat_pictures(sig_a[ra]) & flat_pictures(sig_b[rb])] = np.inf
        d[s : s + chunk] = part
    return d <= 1.0, d


ALL_PAIRS_UP_TO = 2048  # first photos: below this every pair is compared (hashes need a gallery)
# 2: thresholds over distinct looks (HashCoder.fit), a re-upload of a copy exact; 3: two flat pictures never near;
# 4: looks distinct over the hashed parts only. Saved groups of another version are found again.
FINDER_VERSION = 4


def _rule_alone(rule: NearRule) -> NearRule:
    """The rule without its hash filter: every pair judged by the signatures (galleries of at most
    ALL_PAIRS_UP_TO pictures)."""
    return replace(rule, max_bits=64)


def near_pairs(index: DuplicateIndex, extra: tuple[np.ndarray, np.ndarray] | None = None,
               all_pairs: bool | None = None) -> Pairs:
    """Confirmed near pairs among a gallery's first photos: band candidates, plus `extra`
    candidates (neighbour_pairs) mapped to the first photos of their exact-copy sets. all_pairs:
    whether every pair is compared (None: when there are at most ALL_PAIRS_UP_TO first photos).

    A gallery of at most ALL_PAIRS_UP_TO first photos has every pair compared by the signature rule
    alone (at most 2 million pairs, under a second): the hash thresholds are medians of the gallery,
    too unsteady over a few dozen photos to filter by (measured: a 16-photo gallery put two planted
    copies 14 bits apart that a 300-photo one put 2 and 7 bits apart).
    """
    gallery = (index.signals.signature, index.codes)
    if all_pairs if all_pairs is not None else len(index.firsts) <= ALL_PAIRS_UP_TO:
        i, j = np.triu_indices(len(index.firsts), 1)
        a, b = index.firsts[i], index.firsts[j]
        ok, d = _confirm((*gallery, a), (*gallery, b), _rule_alone(index.rule))
        return Pairs.of(a[ok], b[ok], "near", d[ok])
    a, b = index.candidates()
    if extra is not None:
        ea, eb = index.exact_first[extra[0]], index.exact_first[extra[1]]
        a, b = _unique_pairs(np.concatenate([a, ea]), np.concatenate([b, eb]))
    ok, d = _confirm((*gallery, a), (*gallery, b), index.rule)
    return Pairs.of(a[ok], b[ok], "near", d[ok])


def groups_from_pairs(signals: PhotoSignals, pairs: Pairs, rule: NearRule = DEFAULT_RULE) -> list[DuplicateGroup]:
    """Connected components of the pairs (union-find), each with its kinds and distances to its
    first photo; groups in the order of their first photos. A member is "exact" when it has the
    pixels of a member before it (the first photo: when another has its pixels), "near" otherwise."""
    n = len(signals)
    if len(pairs) == 0:
        return []
    graph = coo_matrix((np.ones(len(pairs), np.int8), (pairs.a, pairs.b)), shape=(n, n))
    labels = connected_components(graph, directed=False)[1]
    members = np.nonzero(np.bincount(labels)[labels] > 1)[0]
    members = members[np.argsort(labels[members], kind="stable")]  # by group, ascending inside each
    starts = np.nonzero(np.r_[True, labels[members][1:] != labels[members][:-1]])[0]
    first = np.repeat(members[starts], np.diff(np.r_[starts, len(members)]))
    exact = (signals.pixel[members] == signals.pixel[first]) & (signals.pixel[members] != "")
    dist = signature_distances(signals.signature[members], signals.signature[first], rule)
    dist[exact] = 0.0
    groups = []
    for s, e in zip(starts.tolist(), np.r_[starts[1:], len(members)].tolist()):
        kinds, seen = [], set()
        for p in signals.pixel[members[s:e]].tolist():  # a re-upload of a member before it: exact
            kinds.append("exact" if p and p in seen else "near")
            seen.add(p)
        kinds[0] = "exact" if exact[s + 1 : e].any() else "near"  # the first photo: has the group its pixels?
        groups.append(DuplicateGroup(members[s:e].tolist(), kinds, [round(d, 4) for d in dist[s:e].tolist()]))
    return sorted(groups, key=lambda g: g.members[0])


def find_duplicates(signals: PhotoSignals, rule: NearRule = DEFAULT_RULE,
                    neighbours: tuple[np.ndarray, np.ndarray] | None = None,
                    coder: HashCoder | None = None) -> list[DuplicateGroup]:
    """Every duplicate group among N photos (a build).

    Args:
        signals: the photos' signals, position i = photo i.
        neighbours: optionally (indices (N, k), cosine distances (N, k)) from the embedding index:
            more candidates, confirmed by the same rule.
        coder: the hash coder (default: fitted on these photos).
    Returns:
        groups in the order of their first photos.
    """
    index = DuplicateIndex(signals, rule, coder)
    extra = neighbour_pairs(*neighbours) if neighbours is not None else None
    return groups_from_pairs(signals, index.exact_pairs().concat(near_pairs(index, extra)), rule)


def check_new(index: DuplicateIndex, new: PhotoSignals, every: bool | None = None) -> Pairs:
    """New photos checked against the whole gallery (its band tables, probed with the gallery's
    coder) and against each other.

    Positions: the gallery's 0..N-1, then the new photos' N..N+M-1 (the update's order: kept
    photos first, new ones after). Returns confirmed pairs (exact and near) involving a new photo.
    Where kept and new photos together are at most ALL_PAIRS_UP_TO pictures (every; None: found
    here), every new one is compared with every kept one by the rule alone, as a fresh run compares them.
    """
    n = len(index)
    exact_to = index.exact_matches(new.pixel)
    hit = np.nonzero(exact_to >= 0)[0]
    pairs = Pairs.of(exact_to[hit], hit + n, "exact")
    fresh = np.nonzero(exact_to < 0)[0]  # a new photo with a gallery photo's pixels joins through it
    among = DuplicateIndex(new, index.rule, index.coder, index.max_bucket, index.n_tables)
    codes = among.codes
    every = _compares_all_pairs(index.signals, new) if every is None else every
    rule = _rule_alone(index.rule) if every else index.rule
    if every:
        q, g = np.repeat(fresh, len(index.firsts)), np.tile(index.firsts, len(fresh))
    else:
        q, g = index.probe(codes[fresh])
        q = fresh[q]
    ok, d = _confirm((new.signature, codes, q), (index.signals.signature, index.codes, g), rule)
    pairs = pairs.concat(Pairs.of(g[ok], q[ok] + n, "near", d[ok]))
    inner = among.exact_pairs().concat(near_pairs(among, all_pairs=every))
    return pairs.concat(Pairs(inner.a + n, inner.b + n, inner.kind, inner.distance))


def _compares_all_pairs(kept: PhotoSignals, new: PhotoSignals) -> bool:
    """Whether a fresh run over kept and new photos compares every pair: at most ALL_PAIRS_UP_TO
    distinct pictures (near_pairs)."""
    pixel = np.concatenate([kept.pixel, new.pixel])
    return int(np.count_nonzero(_exact_firsts(pixel) == np.arange(len(pixel)))) <= ALL_PAIRS_UP_TO


def update_groups(previous: Sequence[DuplicateGroup], index: DuplicateIndex, new: PhotoSignals) -> list[DuplicateGroup]:
    """The groups after an update: those a fresh run over the kept and new photos finds with the
    same coder.

    Args:
        previous: the groups before the update, renumbered to the kept photos' positions with
            removed photos dropped (`renumber_groups`).
        index: the kept photos' index (positions 0..N-1).
        new: the new photos (positions N..N+M-1).
    Pairs of kept photos are checked again only inside previous groups (a pair across two groups
    would have joined them); the new photos go through `check_new`.
    """
    every = _compares_all_pairs(index.signals, new)
    kept = _pairs_within(previous, index, every=every)
    return groups_from_pairs(index.signals.concat(new), kept.concat(check_new(index, new, every)), index.rule)


def _pairs_within(groups: Sequence[DuplicateGroup], index: DuplicateIndex, every: bool = False) -> Pairs:
    """Confirmed pairs inside each group (exact, or near among band candidates; every: near by the
    rule alone, as a fresh run of at most ALL_PAIRS_UP_TO pictures): a removed photo may have been
    what linked two others, so what still holds is checked again."""
    if not groups:
        return Pairs.of(np.zeros(0), np.zeros(0), "exact")
    ends = [np.triu_indices(len(g.members), 1) for g in groups]
    a = np.concatenate([np.asarray(g.members, np.int64)[i] for g, (i, _) in zip(groups, ends)])
    b = np.concatenate([np.asarray(g.members, np.int64)[j] for g, (_, j) in zip(groups, ends)])
    exact = index.exact_first[a] == index.exact_first[b]
    pairs = Pairs.of(a[exact], b[exact], "exact")
    a, b = _unique_pairs(index.exact_first[a[~exact]], index.exact_first[b[~exact]])
    if not every:
        shared = np.zeros(len(a), bool)
        for keys in band_keys(index.codes, index.n_tables):
            shared |= keys[a] == keys[b]
        a, b = a[shared], b[shared]
    gallery = (index.signals.signature, index.codes)
    ok, d = _confirm((*gallery, a), (*gallery, b), _rule_alone(index.rule) if every else index.rule)
    return pairs.concat(Pairs.of(a[ok], b[ok], "near", d[ok]))


def renumber_groups(groups: Sequence[DuplicateGroup], new_position: np.ndarray) -> list[DuplicateGroup]:
    """Groups with positions mapped through new_position (int (N_old,), -1 for a removed photo);
    removed members are dropped and groups left with one photo disappear. Kinds and distances
    are recomputed by update_groups, so they are carried as they were."""
    out = []
    for g in groups:
        kept = [(int(new_position[m]), k, d) for m, k, d in zip(g.members, g.kinds, g.distances)
                if new_position[m] >= 0]
        if len(kept) > 1:
            kept.sort()
            out.append(DuplicateGroup([m for m, _, _ in kept], [k for _, k, _ in kept], [d for _, _, d in kept]))
    return out


# role: "first" for each group's first photo (the first in the dataset's order), "copy" for the others:
# `kind` says of the first photo whether another has its pixels, so a filter on kind alone took every
# photo of such a group. width, height (pixels) and bytes (the image file's size) help choose the keeper.
DUPLICATES_FIELDS = ["group", "source_row", "file", "kind", "distance", "source", "role", "width", "height", "bytes"]
_EARLIER_FIELDS = (DUPLICATES_FIELDS[:5], DUPLICATES_FIELDS[:6])  # before `source`, before role and sizes


def duplicates_csv(groups: Sequence[DuplicateGroup], source_rows: Sequence[int], files: Sequence[str],
                   sources: Sequence[str] | None = None,
                   sizes: Callable[[int], tuple[object, object, object]] | None = None) -> str:
    """The CSV text: one line per photo in a group, groups in order, each group's first photo first;
    `source` is what the user knows the photo by (manifest.csv's: a path in the dataset folder, or
    `<dataset>[row]`), empty when not given; `sizes(position)`: its (width, height, bytes), empty
    when not given."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(DUPLICATES_FIELDS)
    for number, g in enumerate(groups):
        for r, (m, kind, dist) in enumerate(zip(g.members, g.kinds, g.distances)):
            writer.writerow([number, source_rows[m], files[m], kind, f"{dist:.4f}",
                             sources[m] if sources is not None else "", "first" if r == 0 else "copy",
                             *(sizes(m) if sizes is not None else ("", "", ""))])
    return buf.getvalue()


def write_duplicates_csv(path: str | Path, groups: Sequence[DuplicateGroup], source_rows: Sequence[int],
                         files: Sequence[str], sources: Sequence[str] | None = None,
                         sizes: Callable[[int], tuple[object, object, object]] | None = None) -> None:
    """Write outputs/duplicates.csv atomically (columns DUPLICATES_FIELDS); positions index
    source_rows, files, sources and sizes."""
    _write_if_changed(Path(path), duplicates_csv(groups, source_rows, files, sources, sizes))


def read_duplicates_csv(path: str | Path) -> list[DuplicateGroup]:
    """The groups of a duplicates.csv, members given by their source_row (map them to positions
    with `renumber_groups`, an array indexed by source row)."""
    groups: dict[int, DuplicateGroup] = {}
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames not in (DUPLICATES_FIELDS, *_EARLIER_FIELDS):  # a file of an earlier release
            raise ValueError(f"{path}: columns {reader.fieldnames}, expected {DUPLICATES_FIELDS}")
        for row in reader:
            g = groups.setdefault(int(row["group"]), DuplicateGroup([], [], []))
            g.members.append(int(row["source_row"]))
            g.kinds.append(row["kind"])
            g.distances.append(float(row["distance"]))
    return [groups[k] for k in sorted(groups)]


def representatives(groups: Sequence[DuplicateGroup], n: int) -> np.ndarray:
    """int64 (n,): each photo's group's first photo, or the photo itself outside any group."""
    out = np.arange(n, dtype=np.int64)
    for g in groups:
        out[g.members] = g.members[0]
    return out


def keep_one_per_group(indices: np.ndarray, distances: np.ndarray, group_of: np.ndarray, k: int,
                       own: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A top-k result with one photo per duplicate group (--dedup): the group's best-ranked member
    stands for it, with its own distance; later members are dropped and the row closes up to k,
    padded with -1 (and +inf).

    Args:
        indices, distances: (Q, K) gallery positions ascending by distance, -1 where there is none;
            K >= k, so that k remain after the drop when the gallery has them.
        group_of: `representatives(groups, N)`.
        own: optional int (Q,), a gallery position per query whose group is left out entirely (a
            photo's own copies are not its neighbours); -1 for none.
    Returns:
        int64 (Q, k) indices, float32 (Q, k) distances.
    """
    idx = np.atleast_2d(np.asarray(indices))
    dist = np.atleast_2d(np.asarray(distances, np.float32))
    rep = np.where(idx >= 0, group_of[np.maximum(idx, 0)], -1)
    out_i = np.full((len(idx), k), -1, np.int64)
    out_d = np.full((len(idx), k), np.inf, np.float32)
    for q, row in enumerate(rep):
        _, first_at = np.unique(row, return_index=True)
        keep = np.sort(first_at[row[first_at] >= 0])
        if own is not None and own[q] >= 0:
            keep = keep[row[keep] != group_of[own[q]]]
        keep = keep[:k]
        out_i[q, : len(keep)], out_d[q, : len(keep)] = idx[q, keep], dist[q, keep]
    return out_i, out_d


# ----------------------------------------------------------------------------- in the pipeline
# Each manifest line carries its item's signals (store.ManifestRow.pixel_hash and .look); the
# gallery run finds the groups over its embedded items (positions = embedding rows), writes
# outputs/duplicates.csv and keeps the groups beside the store (GROUPS_FILE) for --dedup.

GROUPS_FILE = "duplicates.json"  # in the store folder, keyed by the store's manifest


def look_text(signature: np.ndarray) -> str:
    """A look signature for a manifest column: its version, then `signature_text`."""
    return f"{SIGNATURE_VERSION}:{signature_text(signature)}"


def signed_now(look: str) -> bool:
    """Whether a manifest line's `look` is of this SIGNATURE_VERSION (`look_text`'s)."""
    return look.startswith(SIGNATURE_VERSION + ":")


SIGNATURE_MIN_SIDE = 192  # a signature is taken from a decode at least this large (or full size)


def item_signals(image: Image.Image, full_size: tuple[int, int] | None = None,
                 larger: Image.Image | None = None) -> tuple[str, str]:
    """(pixel hash, look text) of an item as the pipeline decoded it.

    Args:
        image: the decoded picture (a JPEG may be decoded at a reduced scale for the model).
        full_size: the photo's (width, height) when `image` is reduced.
        larger: a decode of the same photo at least SIGNATURE_MIN_SIDE on its short side, for the
            signature, when `image` is reduced below that.
    """
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    return pixel_hash(rgb_array(rgb), full_size), look_text(look_signature(larger or rgb))


def signals_of_rows(rows: Sequence) -> tuple[PhotoSignals, np.ndarray]:
    """The signals of the manifest lines that have them (of this SIGNATURE_VERSION), in dataset
    order (source_row, person), and their positions in `rows`. Lines of a store made before
    duplicates have none."""
    head = SIGNATURE_VERSION + ":"
    have = [i for i, r in enumerate(rows) if signed_now(r.look)]
    at = np.array(sorted(have, key=lambda i: (rows[i].source_row, rows[i].person)), np.int64)
    texts = [rows[i].look[len(head):] for i in at.tolist()]
    sig = signatures_from_text(texts) if texts else np.zeros((0, SIGNATURE_SIZE), np.int8)
    return PhotoSignals(np.array([rows[i].pixel_hash for i in at.tolist()], dtype=str), sig), at


def gallery_duplicates(rows: Sequence, neighbours: tuple[np.ndarray, np.ndarray] | None = None,
                       rule: NearRule = DEFAULT_RULE) -> tuple[list[DuplicateGroup], int]:
    """The duplicate groups of a gallery's embedded items.

    Found in dataset order, so that a group's first photo is its lowest dataset row and an updated
    store's groups are a fresh build's (whose lines are in another order).

    Args:
        rows: the manifest lines in embedding-row order (position i = embedding row i).
        neighbours: optionally each item's top-k (indices, distances) in the same positions.
    Returns:
        (groups over the positions, members in dataset order; how many items had no signals and
        were left out).
    """
    signals, at = signals_of_rows(rows)
    if len(at) < 2:
        return [], len(rows) - len(at)
    extra = None
    if neighbours is not None:
        local = np.full(len(rows), -1, np.int64)
        local[at] = np.arange(len(at))
        idx, dist = neighbours
        idx = idx[at]
        mapped = np.where(idx >= 0, local[np.maximum(idx, 0)], -1)
        extra = (mapped, np.asarray(dist)[at])
    groups = find_duplicates(signals, rule, neighbours=extra)
    return [DuplicateGroup([int(at[m]) for m in g.members], g.kinds, g.distances) for g in groups], len(rows) - len(at)


def groups_key(manifest_sha256: str, rule: NearRule = DEFAULT_RULE) -> str:
    """What saved groups hold for: the signature, the rule, the finder's settings and the manifest."""
    settings = (f"{rule.structure},{rule.colour},{rule.texture},{rule.centre},{rule.max_bits};{ALL_PAIRS_UP_TO};"
                f"{TABLES}x{BANDS};{FINDER_VERSION}")
    return f"{SIGNATURE_VERSION}/{settings}/{manifest_sha256}"


def write_groups(store_dir: Path, manifest_sha256: str, groups: Sequence[DuplicateGroup]) -> None:
    """The groups beside the store, for --dedup in the modes that only read it."""
    data = {"key": groups_key(manifest_sha256),
            "groups": [[g.members, g.kinds, g.distances] for g in groups]}
    _write_if_changed(Path(store_dir) / GROUPS_FILE, json.dumps(data, separators=(",", ":")))


def _write_if_changed(path: Path, text: str) -> None:
    """Atomically, and not at all when the file already says it (an update that changed nothing
    rewrites nothing)."""
    try:
        if path.read_text(encoding="utf-8") == text:
            return
    except (OSError, UnicodeDecodeError):
        pass
    atomic_write_text(path, text)


def read_groups(store_dir: Path, manifest_sha256: str, n_rows: int | None = None) -> list[DuplicateGroup] | None:
    """The groups a gallery run found for this store, or None when there are none for its manifest."""
    try:
        data = json.loads((Path(store_dir) / GROUPS_FILE).read_text())
        if data.get("key") != groups_key(manifest_sha256):
            return None
        groups = [DuplicateGroup([int(x) for x in m], list(k), list(d)) for m, k, d in data["groups"]]
        if n_rows is not None and any(not 0 <= x < n_rows for g in groups for x in g.members):
            log.warning("%s names rows outside the store: finding the groups again", Path(store_dir) / GROUPS_FILE)
            return None
        return groups
    except (OSError, ValueError, TypeError, KeyError):
        return None


def unsigned_rows(rows: Sequence) -> int:
    """How many manifest lines have no signals of this SIGNATURE_VERSION (a store made before
    duplicates were found, or by an earlier signature): left out of duplicate finding."""
    return sum(1 for r in rows if not signed_now(r.look))


def unsigned_note(unsigned: int, total: int) -> str:
    """What a reader of a store whose lines are not all signed by this version is told."""
    return (f"duplicates: {unsigned:,} of the store's {total:,} items {'has' if unsigned == 1 else 'have'} no "
            f"duplicate signals of this version ({SIGNATURE_VERSION}): they are in no group, so --dedup may show "
            "each of their copies; --update signs them again where it can, from their files and with no inference "
            "(its summary says which it cannot)")


_WARNED: set[tuple[str, str]] = set()  # (store, manifest) whose unsigned lines were said: once a process


def stored_groups(store_dir: Path, rows: Sequence, manifest_sha256: str) -> list[DuplicateGroup]:
    """The groups of a store for --dedup: those its last gallery run found (GROUPS_FILE), else found
    now from the lines' signals (the same groups: both come from the signals alone). Lines without
    this version's signals are in no group: said as a warning (`unsigned_note`), once for a version
    of a store."""
    groups = read_groups(store_dir, manifest_sha256, len(rows))
    if groups is None:
        log.info("no duplicate groups saved for %s by a gallery run of this signature (%s): finding them from the "
                 "photos' signals", store_dir, SIGNATURE_VERSION)
        groups, _ = gallery_duplicates(rows)
    if (unsigned := unsigned_rows(rows)) and (key := (str(store_dir), manifest_sha256)) not in _WARNED:
        _WARNED.add(key)
        log.warning(unsigned_note(unsigned, len(rows)))
    return groups
