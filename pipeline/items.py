"""Gallery items: dataset records in; for each record its items out: the picture to embed, the bytes of
its image file and its manifest line, or a recorded failure. One item per row in the standard run,
one per person crop in the segmentation run.

`ItemPipeline` is the one way an item becomes a model input: records -> items -> files written ->
model input and thumbnail. The local engine's workers and the Ray engine's tasks both call it; they
differ only in how they spread the records and gather the results.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from PIL import Image
from tqdm import tqdm

from .dataset import Record
from .duplicates import SIGNATURE_MIN_SIDE, SIGNATURE_VERSION, item_signals, signed_now
from .errors import PipelineError, first_line
from .fileio import atomic_write_bytes, sha256_bytes
from .gpu import EncodedJpeg, inspect_jpeg
from .images import DecodedImage, ImageDecodeError, decode_image, encode_png, sniff_format
from .persons import CappedPersons, Segmenter, person_crop
from .plots import make_thumbnail
from .preprocess import PreprocessConfig, model_crop, resize_for_model, to_model_input
from .report import RunSummary
from .store import ManifestRow
from .yolo import SegmentSpec

log = logging.getLogger(__name__)


@dataclass
class GalleryItem:
    """One thing to embed (or a recorded failure): its manifest line, its pixels, its file bytes.

    image: RGB pixels to embed; None when the item failed, has nothing to embed (row.status says),
        or is left encoded for the device decoder.
    data: bytes to write to images_dir / row.file; None to write nothing.
    encoded: a JPEG the device decodes and preprocesses itself (gpu.py), instead of `image`.
    """

    row: ManifestRow
    image: Image.Image | None = None
    data: bytes | None = None
    encoded: EncodedJpeg | None = None

    @property
    def to_embed(self) -> bool:
        return self.row.status == "ok" and (self.image is not None or self.encoded is not None)


# Records in, for each record its items (several crops, one image, or one recorded failure).
ItemMaker = Callable[[list[Record]], list[list[GalleryItem]]]


# A gallery file is named by its own bytes: img_<first 16 hex digits of their sha256>.jpg. The name
# never depends on where the photo sits in the dataset, so an update that removes or inserts rows
# renames nothing (and redraws nothing that shows the name), and a fresh build over the same photos
# names them alike. Equal bytes are one file, whichever rows hold them. 64 bits: a clash is not
# expected below ~10^8 files, and write_store refuses one.
NAME_DIGITS = 16


def image_file_name(file_sha256: str, ext: str) -> str:
    """A standard gallery's file for bytes with this sha256."""
    return f"img_{file_sha256[:NAME_DIGITS]}.{ext}"


def crop_file_name(file_sha256: str) -> str:
    """A segmented gallery's PNG crop (or whole picture) with this sha256."""
    return f"seg_{file_sha256[:NAME_DIGITS]}.png"


def source_sha256(record: Record) -> str:
    """The sha256 of the record's cell bytes, for its manifest lines (ManifestRow.source_sha256): with
    the --id-column value (item_id), what --update knows the photo by."""
    return sha256_bytes(record.data) if record.data is not None else ""


def decode_record(record: Record, min_side: int | None = None) -> tuple[ManifestRow, DecodedImage | None]:
    """A record's manifest line and its decoded image; when the row has no image or it does not
    decode, the image is None and the line records the failure (both item makers start here)."""
    row = ManifestRow(index=-1, file="", source_row=record.source_row, source=record.source,
                      item_id=record.item_id, source_sha256=source_sha256(record))
    if record.data is None:
        row.status, row.error = "failed", record.error
        return row, None
    try:
        return row, decode_image(record.data, min_side=min_side)
    except ImageDecodeError as e:
        row.status, row.error, row.sha256 = "failed", str(e), row.source_sha256  # the cell's bytes, hashed above
        return row, None


def signals_of(data: bytes, decoded: DecodedImage) -> tuple[str, str]:
    """(pixel hash, look) of a photo for its manifest line (duplicates.item_signals), from the decode
    the model gets; only a JPEG reduced below the signature's size (for a model under 192 px) is
    decoded once more, at that size."""
    full = (decoded.width, decoded.height)
    if decoded.image.size == full:
        return item_signals(decoded.image)
    small = min(decoded.image.size) < SIGNATURE_MIN_SIDE
    return item_signals(decoded.image, full, decode_image(data, SIGNATURE_MIN_SIDE).image if small else None)


def file_signals(name: str, data: bytes, min_side: int | None) -> tuple[str, str]:
    """(pixel hash, look) of a gallery's image file `name` as its build made them: a segmented
    gallery's crop (or whole picture, `seg_*`) whole; a standard gallery's photo, its file the
    dataset's bytes (or their PNG), decoded as the build decoded it, at the model's reduced DCT scale
    (`min_side`, PreprocessConfig.decode_min_side)."""
    if name.startswith("seg_"):
        return item_signals(decode_image(data).image)
    return signals_of(data, decode_image(data, min_side))


def image_reader(*places: str | Path) -> Callable[[str], bytes]:
    """The bytes of a gallery's image file by name, from the first of `places` (folders or URLs,
    remote.py) that holds it: the working copy of a URL --output-dir lacks the files another copy's
    run wrote to the URL. FileNotFoundError where none holds it."""
    from .remote import filesystem, is_url

    def at_url(url: str) -> Callable[[str], bytes]:
        fs, root = filesystem(url.rstrip("/"))
        return lambda name: fs.cat_file(f"{root}/{name}")

    def in_folder(folder: Path) -> Callable[[str], bytes]:
        return lambda name: (folder / name).read_bytes()

    @functools.cache  # made when a file is first read (a URL's filesystem opened only then)
    def readers() -> list[Callable[[str], bytes]]:
        return [at_url(str(place)) if is_url(place) else in_folder(Path(place)) for place in places]

    def read(name: str) -> bytes:
        *first, last = readers()
        for reader in first:
            try:
                return reader(name)
            except FileNotFoundError:
                continue
        return last(name)

    return read


SIGN_CHUNK = 1024  # files handed to the decoding threads at a time
_T = TypeVar("_T")


def unsigned_lines(rows: Sequence[ManifestRow]) -> list[ManifestRow]:
    """The lines with a picture whose duplicate signals are not of this SIGNATURE_VERSION (an earlier
    signature's, or none): those the decode of their file signs again."""
    return [r for r in rows if r.file and r.status != "failed" and not signed_now(r.look)]


def signed_in_chunks(pool: ThreadPoolExecutor, sign: Callable[[str], _T], names: Sequence[str]
                     ) -> Iterator[tuple[str, _T]]:
    """(name, sign(name)) for each file name, on the pool's threads (decoding lets the GIL go),
    SIGN_CHUNK at a time: a million futures at once would not be small, and a Ctrl-C cancels what
    is not started."""
    for start in range(0, len(names), SIGN_CHUNK):
        chunk = names[start : start + SIGN_CHUNK]
        yield from zip(chunk, pool.map(sign, chunk))


def sign_resumed(rows: Sequence[ManifestRow], read: Callable[[str], bytes], min_side: int | None,
                 summary: RunSummary, threads: int = 1, progress: bool = True) -> int:
    """The lines of a resumed build's shards that an earlier signature version signed (a run
    interrupted, the code updated, the run resumed), signed again in place from their files, each
    file once, so that the store comes out as a fresh build's and no photo is left out of duplicate
    finding; nothing is embedded again. A file that cannot be read or decoded leaves its lines with
    the signals they had, said. A file gone from the gallery's images stops the run before the store
    is written (PipelineError; the shards stay): the store would be refused without it. Returns how
    many lines were signed again."""
    stale = unsigned_lines(rows)
    if not stale:
        return 0
    files = sorted({r.file for r in stale})

    def sign(name: str) -> tuple[str, str] | Exception:
        try:
            return file_signals(name, read(name), min_side)
        except Exception as e:  # noqa: BLE001 - any reader's or decoder's error is this file's, said
            return e

    got: dict[str, tuple[str, str] | Exception] = {}
    with (summary.stage("sign resumed shards again"), ThreadPoolExecutor(max(1, threads)) as pool,
          tqdm(total=len(files), desc=f"duplicate signals ({SIGNATURE_VERSION})", unit="file",
               disable=not progress) as bar):
        for name, result in signed_in_chunks(pool, sign, files):
            got[name] = result
            bar.update()
    if gone := [name for name, v in got.items() if isinstance(v, FileNotFoundError)]:
        raise PipelineError(
            f"{len(gone)} image file(s) of the resumed shards are gone from the gallery's images "
            f"({', '.join(gone[:3])}{' ...' if len(gone) > 3 else ''}), so the store cannot be finished: put them "
            "back and run the same command again, or add --fresh to start over")
    signed = 0
    for r in stale:
        if isinstance(signals := got[r.file], tuple):
            r.pixel_hash, r.look = signals
            signed += 1
    if signed:
        summary.count("signed again", signed)
        summary.notes.append(f"duplicates: {signed} line(s) of the resumed shards signed again ({SIGNATURE_VERSION}: "
                             "their run began under an earlier signature), from their files; nothing embedded again")
    if failed := [f"{name}: {first_line(v)}" for name, v in got.items() if isinstance(v, Exception)]:
        summary.notes.append(f"duplicates: {len(failed)} file(s) of the resumed shards could not be signed again and "
                             "their lines are left out of duplicate finding (--update signs them where it can): "
                             + "; ".join(failed[:3]) + (" ..." if len(failed) > 3 else ""))
    return signed


def make_standard_items(decode_min_side: int, device_decode: bool = False) -> ItemMaker:
    """Item maker for the standard run: one image per row, written unchanged when JPEG/PNG.

    With device_decode, JPEGs the device decoder takes are left encoded (only their header is read
    here); everything else is decoded on the CPU as always.
    """

    def items(records: list[Record]) -> list[list[GalleryItem]]:
        return [one(r) for r in records]

    def one(record: Record) -> list[GalleryItem]:
        if device_decode and record.data is not None and (jpeg := inspect_jpeg(record.data)) is not None:
            sha = sha256_bytes(record.data)  # the file is the cell's bytes: one hash for both
            row = ManifestRow(index=-1, file=image_file_name(sha, "jpg"), source_row=record.source_row,
                              source=record.source, sha256=sha, item_id=record.item_id, source_sha256=sha)
            row.width, row.height = jpeg.oriented_size
            try:  # the duplicate signals are the CPU's: the same as a CPU build's
                row.pixel_hash, row.look = signals_of(record.data, decode_image(record.data, decode_min_side))
            except ImageDecodeError:
                pass  # the device decoder says what is wrong with it
            return [GalleryItem(row, data=record.data, encoded=jpeg)]
        row, decoded = decode_record(record, decode_min_side)
        if decoded is None or record.data is None:  # decode_record recorded why
            return [GalleryItem(row)]
        ext = sniff_format(record.data)
        # JPEG and PNG are kept byte for byte; anything else is encoded once, losslessly.
        data = record.data if ext else encode_png(decoded.image)
        row.sha256 = row.source_sha256 if data is record.data else sha256_bytes(data)
        row.file = image_file_name(row.sha256, ext or "png")
        row.width, row.height, row.note = decoded.width, decoded.height, decoded.note
        row.pixel_hash, row.look = signals_of(record.data, decoded)
        return [GalleryItem(row, decoded.image, data)]

    return items


def make_segment_items(segmenter: Segmenter, spec: SegmentSpec) -> ItemMaker:
    """Item maker for --use-segmentation: each image decoded once at full size, segmented, and cut
    into one white-background crop per person (PNG, so the file re-embeds to the same vector), at
    most spec.max_persons of them (the most confident; a photo that held more says so in its lines'
    note)."""

    def items(records: list[Record]) -> list[list[GalleryItem]]:
        out: list[list[GalleryItem]] = [[] for _ in records]
        decoded = []
        for k, rec in enumerate(records):
            row, d = decode_record(rec)  # full size: the crops are cut from it
            if d is None:
                out[k] = [GalleryItem(row)]
            else:
                decoded.append((k, rec, d, np.asarray(d.image)))
        persons_per_image = segmenter.segment_capped([arr for *_, arr in decoded], spec.max_persons)
        for (k, rec, d, arr), found in zip(decoded, persons_per_image):
            out[k] = crops_of_row(rec, d, arr, found, spec)
        return out

    return items


# The note on every line of a photo that held more persons than --max-persons; the summary counts them.
CUT_MARK = "(--max-persons)"


NO_MASK = "no person with a mask"  # a photo whose persons all lost their masks (Ultralytics drops empty ones)


def cut_note(cap: int) -> str:
    return f"more than {cap} person(s) found: the {cap} most confident kept {CUT_MARK}"


def photos_cut(rows: Sequence[ManifestRow]) -> int:
    """How many source rows (photos) had persons left out by the --max-persons cap."""
    return len({r.source_row for r in rows if CUT_MARK in r.note})


def note_persons_cut(rows: Sequence[ManifestRow], cap: int, summary: RunSummary) -> None:
    """Say, in the summary's notes and the log, how many photos the --max-persons cap cut."""
    n = photos_cut(rows)
    if not n:
        return
    text = f"{n} photo(s) had more than {cap} persons; the {cap} most confident of each were kept (--max-persons)"
    summary.notes.append(text)
    log.warning("%s", text)


def join_notes(*notes: str) -> str:
    return "; ".join(n for n in notes if n)


def crops_of_row(
    rec: Record, decoded: DecodedImage, arr: np.ndarray, found: CappedPersons, spec: SegmentSpec
) -> list[GalleryItem]:
    """One item per person (a failure for a person with nothing to cut), or the row's single item
    when nobody was found: the whole picture with --keep-unsegmented, else a no_person line."""
    items = []
    sha = source_sha256(rec)
    note = join_notes(decoded.note, cut_note(spec.max_persons) if found.cut else "")
    for p, person in enumerate(found.persons):
        crop = person_crop(arr, person)
        x1, y1, x2, y2 = (round(float(v), 2) for v in person.box_xyxy)
        row = ManifestRow(
            index=-1,
            file="",
            source_row=rec.source_row,
            source=rec.source,
            note=note,
            person=p,
            confidence=round(person.confidence, 6),
            mask_area="" if person.area is None else person.area,
            box_x1=x1,
            box_y1=y1,
            box_x2=x2,
            box_y2=y2,
            item_id=rec.item_id,
            source_sha256=sha,
        )
        if crop is None:
            row.status, row.error, row.file = "failed", "empty person mask or box", ""
            items.append(GalleryItem(row))
            continue
        image = Image.fromarray(crop)
        data = encode_png(image)
        row.sha256, row.height, row.width = sha256_bytes(data), crop.shape[0], crop.shape[1]
        row.file = crop_file_name(row.sha256)
        row.pixel_hash, row.look = item_signals(image)
        items.append(GalleryItem(row, image, data))
    if items:
        return items
    row = ManifestRow(index=-1, file="", source_row=rec.source_row, source=rec.source, width=decoded.width,
                      height=decoded.height, note=decoded.note, item_id=rec.item_id, source_sha256=sha)
    if spec.keep_unsegmented:
        image = Image.fromarray(arr)
        data = encode_png(image)
        row.sha256 = sha256_bytes(data)
        row.file = crop_file_name(row.sha256)
        row.pixel_hash, row.look = item_signals(image)
        why = (f"{NO_MASK} among the {spec.max_persons} most confident" if found.cut else "no person found")
        row.note = join_notes(note, f"{why}: whole image kept (--keep-unsegmented)")
        return [GalleryItem(row, image, data)]
    row.status, row.note = "no_person", note
    # Ultralytics drops persons whose mask is empty: all of the most confident may have had one.
    row.error = (
        f"{NO_MASK} among the {spec.max_persons} most confident"
        if found.cut
        else "no person detected"
    )
    return [GalleryItem(row)]


def write_image(images_dir: Path, name: str, data: bytes) -> None:
    """An item's image file, written atomically (both engines' workers; URLs go through remote.url_writer)."""
    atomic_write_bytes(images_dir / name, data)


@dataclass
class PreparedItem:
    """An item ready for the model.

    pixels: the model input: float32 (3, H, W); uint8 (H, W, 3) crop pixels when another process
        normalizes them (preprocess.normalize_crop); or a JPEG the device decodes (gpu.EncodedJpeg).
        None when there is nothing to embed (row.status says why).
    thumb: uint8 (T, T, 3); None where the device makes it, or nothing is embedded.
    """

    row: ManifestRow
    pixels: Any = None
    thumb: np.ndarray | None = None


@dataclass
class PreparedRecords:
    """ItemPipeline's answer for some records: per record its prepared items, and the seconds spent
    making items, writing their files and preprocessing them."""

    items: list[list[PreparedItem]]
    times: dict[str, float] = field(default_factory=dict)


class ItemPipeline:
    """Records -> items (make_items) -> image files written -> model inputs and thumbnails.

    write: stores one image file (name relative to the images folder, bytes). pixels: the resizer
    (preprocess.CPU_PIXELS; resize_for_model refuses another). crop_only: hand over the uint8 crop
    instead of normalized floats (a quarter of the bytes, for a Ray embedding actor).
    """

    def __init__(self, make_items: ItemMaker, write: Callable[[str, bytes], None], prep: PreprocessConfig,
                 pixels: str, crop_only: bool = False) -> None:
        self.make_items, self.write, self.prep, self.pixels, self.crop_only = make_items, write, prep, pixels, crop_only

    def __call__(self, records: list[Record]) -> PreparedRecords:
        t0 = time.perf_counter()
        made = self.make_items(records)
        t1 = time.perf_counter()
        for item in (i for items in made for i in items):
            if item.data is not None:
                self.write(item.row.file, item.data)
        t2 = time.perf_counter()
        prepared = [[self.prepare(i) for i in items] for items in made]
        t3 = time.perf_counter()
        return PreparedRecords(prepared, {"items": t1 - t0, "write": t2 - t1, "preprocess": t3 - t2})

    def prepare(self, item: GalleryItem) -> PreparedItem:
        if not item.to_embed:
            return PreparedItem(item.row)
        if item.encoded is not None:
            return PreparedItem(item.row, item.encoded)
        assert item.image is not None  # to_embed: an image or an encoded JPEG
        resized = resize_for_model(item.image, self.prep, self.pixels)
        pixels = model_crop(resized, self.prep) if self.crop_only else to_model_input(resized, self.prep)
        # a squashing model's resized picture is out of proportion: the thumbnail is made from the photo
        return PreparedItem(item.row, pixels, make_thumbnail(item.image if self.prep.squash else resized))
