"""What to type when a gallery cache is refused: the flags that made it, or building it first.

A refusal that only lists differences (`onnx_sha256: cache has 'a1…', asked for '9f…'`) leaves the
user to work out which file or flag that was. The sidecar records what made the store, so the way
back can be named: the flags to reuse it as it is, or the command that builds it afresh.
"""

from __future__ import annotations

import shlex
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .backends import ONNXRUNTIME, PRECISIONS
from .config import flag_default
from .fileio import sha256_file_once
from .identity import GallerySource, VectorIdentity
from .preprocess import PIXELS_OF_DECODE
from .store import PARTIAL_DIR, RUN_FILE, unfinished_run

# Sidecar field -> the flag that asks for it (identity fields first, then the gallery source's).
FLAG_OF = {
    "backend": "--backend",
    "model": "--model",
    "precision": "--precision",
    "dataset": "--dataset",
    "config": "--config",
    "split": "--split",
    "limit": "--limit",
    "image_column": "--image-column",
    "seg_model": "--seg-model",
    "seg_backend": "--seg-backend",
    "seg_conf": "--seg-conf",
    "seg_imgsz": "--seg-imgsz",
    "max_persons": "--max-persons",
    "keep_unsegmented": "--keep-unsegmented",
    "id_column": "--id-column",
}
DECODE_OF_PIXELS = {pixels: decode for decode, pixels in PIXELS_OF_DECODE.items()}
MAX_ONNX_FILES = 16  # hashed at most, to name the file a cache was made with


def cache_flag(segmented: bool) -> str:
    return "--use-embedded-segment" if segmented else "--use-embeddings"


def to_cache(segmented: bool) -> str:
    """How the same command reuses the store it built (a segmented build's --use-segmentation and
    --use-embedded-segment cannot be given together)."""
    return ("replace --use-segmentation with --use-embedded-segment in the same command" if segmented
            else "add --use-embeddings to the same command")


def from_cache(segmented: bool) -> str:
    """How a command with the cache flag builds the store instead (without --use-embedded-segment
    alone, it would build the gallery of whole photos)."""
    return ("run the same command with --use-segmentation in place of --use-embedded-segment" if segmented
            else "run the same command without --use-embeddings")


def gallery_run(output_dir: Path | str, segmented: bool, flags: Sequence[str] = ()) -> str:
    """The command that builds the store a search mode (--query-*, --serve, --export) reads
    (output_dir: a folder, or a URL as the user gave it; flags: the gallery-making options the
    search was typed with, as words)."""
    words = ["python main.py", *(["--use-segmentation"] if segmented else []), *flags,
             "--output-dir", shlex.quote(str(output_dir))]
    return " ".join(words)


def build_first(store: Path, segmented: bool, search_from: Path | str | None = None,
                flags: Sequence[str] = ()) -> str:
    """The refusal's last line when there is no store yet; `search_from`: the output folder of a
    search mode, which builds nothing itself (its command has no cache flag to leave out), and
    `flags` the gallery-making options it was typed with (the build takes them)."""
    if search_from is not None:
        given = {w for w in flags if w.startswith("--")}
        missing = [f for f, said in (("--dataset", "--dataset" in given),
                                     ("--model or --onnx", bool(given & {"--model", "--onnx"}))) if not said]
        made_with = "" if not missing else "with the --dataset and --model or --onnx to make it with; " if not flags \
            else f"plus the {' and '.join(missing)} to make it with, where not the default; "
        return (f"Build it first with a gallery run: {gallery_run(search_from, segmented, flags)} ({made_with}it "
                f"writes {store}), then search it.")
    return (
        f"Build it first: {from_cache(segmented)} (it writes {store}); later runs give {cache_flag(segmented)} to "
        "reuse it."
    )


# What an interrupted build began with, named as flags (with the sizes a resume must share)
_UNFINISHED_FIELDS = ("dataset", "config", "split", "limit", "image_column", "id_column", "backend", "model",
                      "precision", "pixels", "runtime", "seg_model", "seg_backend", "seg_conf", "seg_imgsz",
                      "max_persons", "keep_unsegmented")


def finish_unfinished(store: Path, segmented: bool, search_from: Path | str, onnx_asked: str | None) -> str:
    """The refusal's last line for a search mode when a gallery run into `store` stopped before it
    finished (its shards in .partial/): that run again, which resumes, with the flags it began
    with as far as its run file says."""
    began = ""
    params = unfinished_run(store)
    try:
        if params is not None:  # no run file, or one that cannot be read: the flags are not said
            identity = VectorIdentity.from_json(params["identity"], RUN_FILE)
            source = GallerySource.from_json(params["source"], RUN_FILE)
            made = {**source.to_json(), **identity.to_json()}
            # to_json leaves out the default runtime (onnxruntime): only OpenVINO's is named
            names = [n for n in _UNFINISHED_FIELDS if (made.get(n) is not None or n == "limit")
                     and not (n == "keep_unsegmented" and not made.get(n))]
            flags = flags_that_made(names, identity, source, onnx_asked)
            flags += [f"--batch-size {int(params['batch_size'])}", f"--shard-rows {int(params['shard_rows'])}"]
            began = f" It began with {' '.join(flags)}."
    except (ValueError, KeyError, TypeError):  # a run file this version cannot read
        pass
    return (f"A gallery run into it stopped before it finished (its shards are in {store / PARTIAL_DIR}): run it "
            f"again to finish it, {gallery_run(search_from, segmented)} with the flags it had (it resumes where "
            f"it stopped), then search.{began}")


def reuse_or_rebuild(
    differing: Iterable[str], identity: VectorIdentity, source: GallerySource, segmented: bool, onnx_asked: str | None,
    search_from: Path | str | None = None, typed: Sequence[str] = (),
) -> str:
    """The refusal's last line for a store made differently: the flags that made it, then rebuilding.

    Args:
        differing: the sidecar fields that differ from the request.
        identity, source: what the sidecar says made the store.
        onnx_asked: the --onnx of the request, whose folder is searched for the file that made it.
        search_from: the output folder of a search mode (rebuilding is then a gallery run).
        typed: the gallery-making options the command was typed with, which the rebuild takes; what made
            the store is added where they do not say (a cache run that left out --dataset or --model).
    """
    flags = flags_that_made(differing, identity, source, onnx_asked)
    if search_from is not None:
        flags_again = rebuild_flags(typed, identity, source, onnx_asked)
        rebuild = (f"rebuild it with a gallery run: {gallery_run(search_from, segmented, flags_again)} (the old store "
                   "is replaced; change what you want made otherwise).")
    else:  # with what made the store where the command did not type it: left out, the defaults (the hub's)
        adding = rebuild_flags(typed, identity, source, onnx_asked)[: -len(typed) or None]
        rebuild = (f"rebuild it: {from_cache(segmented)}" + (f", adding {' '.join(adding)}" if adding else "")
                   + " (the old store is replaced).")
    if not flags:  # no flag would reuse it
        return rebuild[0].upper() + rebuild[1:]
    return f"To reuse it, ask for what made it: {' '.join(flags)}; or {rebuild}"


SOURCE_FIELDS = ("dataset", "config", "split", "limit", "image_column", "id_column")
SEGMENT_FIELDS = ("seg_model", "seg_backend", "seg_conf", "seg_imgsz", "max_persons", "keep_unsegmented")


def rebuild_flags(typed: Sequence[str], identity: VectorIdentity, source: GallerySource,
                  onnx_asked: str | None) -> list[str]:
    """A rebuild's flags: what the store was made from and with, where the search did not say
    otherwise (`typed`, words), then the typed ones. Typed alone, a rebuild would read the default
    dataset and replace the user's store with the hub's."""
    given = {w for w in typed if w.startswith("--")}
    made = {**source.to_json(), **identity.to_json()}
    words = source_flags(source, identity, given)
    for name in SEGMENT_FIELDS:
        if name in made and FLAG_OF[name] not in given and made[name] not in (None, flag_default(name)):
            words += _flags_for(name, made, onnx_asked)
    if not given & {"--model", "--onnx", "--backend"}:
        words += _flags_for("onnx_sha256" if made.get("backend") == "onnx" else "model", made, onnx_asked)
        if made.get("backend") == "torch" and "--precision" not in given:
            words += _flags_for("precision", made, onnx_asked)  # a model run at fp16 or int8 is rebuilt so
    return words + list(typed)


def source_flags(source: GallerySource, identity: VectorIdentity, given: Iterable[str] = ()) -> list[str]:
    """The flags that ask for the rows a store was made from: its --dataset, and the other dataset
    settings where they are not the defaults (--limit 0 for every row), but for the flags in `given`."""
    made = {**source.to_json(), **identity.to_json()}
    given = set(given)
    names = [n for n in SOURCE_FIELDS if FLAG_OF[n] not in given
             and (n == "dataset" or made.get(n) != flag_default(n)) and (made.get(n) is not None or n == "limit")]
    return flags_that_made(names, identity, source, None)


def flags_that_made(differing: Iterable[str], identity: VectorIdentity, source: GallerySource,
                    onnx_asked: str | None) -> list[str]:
    """The flags that ask for what the store's sidecar records, for the fields `differing` (none
    for a field no flag sets: the model's files changed)."""
    made = {**source.to_json(), **identity.to_json()}
    names = list(dict.fromkeys(differing))
    if made.get("backend") == "onnx":
        # An ONNX store is asked for by its file: its model and precision are the file's, not flags to give
        names = [n for n in names if n not in ("model", "precision")]
        if "backend" in names and "onnx_sha256" not in names:
            names.append("onnx_sha256")
    elif "backend" in names and "model" not in names and made.get("model"):
        # Back to a model the flags load (transformers, open_clip) from an ONNX file: named with the
        # backend, for the request's --model may be the default while the store was made from a folder
        names.insert(names.index("backend") + 1, "model")
    flags: list[str] = []
    for name in names:
        flags += _flags_for(name, made, onnx_asked)
    return flags


def _flags_for(name: str, made: dict[str, Any], onnx_asked: str | None) -> list[str]:
    value = made.get(name)
    if name == "precision" and value not in PRECISIONS:
        return []  # recorded, not a --precision choice: the file or model gives it
    if name == "onnx_sha256" and value:
        found = find_file_with_sha256(value, onnx_asked)
        if found is None:
            return [f"--onnx FILE (the file whose sha256 is {value[:12]}…; none here has it)"]
        return [f"--onnx {shlex.quote(str(found))}"]
    if name == "runtime" and made.get("backend") == "onnx":
        return [f"--onnx-runtime {value or ONNXRUNTIME}"]  # left out of a store's record: onnxruntime
    if name == "pixels" and value in DECODE_OF_PIXELS:
        return [f"--decode {DECODE_OF_PIXELS[value]}"]
    if name == "keep_unsegmented":
        return ["--keep-unsegmented"] if value else ["(without --keep-unsegmented)"]
    if name == "limit":
        return [f"--limit {value if value is not None else 0}"]  # None: every row, which --limit 0 asks for
    if name == "config" and value is None:
        return ["(without --config)"]  # the dataset's default configuration
    if name in FLAG_OF and value is not None:
        return [f"{FLAG_OF[name]} {shlex.quote(str(value))}"]
    return []  # model_sha256, preprocess, dim: the model's files changed; only rebuilding helps


def find_file_with_sha256(sha256: str, near: str | None, recorded: str | None = None) -> Path | None:
    """The file a store recorded (`recorded`, where it still holds those bytes), else an .onnx file
    beside `near`, in ./onnx or in the project's onnx/ (a run from another folder) whose bytes hash
    to `sha256`."""
    if not sha256:  # a store that records none: no file can be it
        return None
    if recorded and Path(recorded).is_file() and sha256_file_once(recorded) == sha256:
        return Path(recorded)
    project = Path(__file__).resolve().parents[1] / "onnx"
    folders = {Path(near).parent if near else Path("onnx"), Path("onnx"), project}
    # a file kept under its own sha256 (export.keep_replaced: <stem>.<12 hex>.onnx) first: a kept int8
    # file's twin link holds the same fp32 bytes under the int8 file's tag, a name that says less
    candidates = sorted((p for folder in folders if folder.is_dir() for p in folder.glob("*.onnx") if p.is_file()),
                        key=lambda p: (f".{sha256[:12]}." not in p.name, p))
    for p in candidates[:MAX_ONNX_FILES]:
        if sha256_file_once(p) == sha256:  # each file hashed once a process (a search mode asks at each open)
            return p
    return None
