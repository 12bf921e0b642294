"""Fashion visual-search pipeline: command line. Parses and validates flags into one RunConfig, then
runs the mode it asks for (pipeline.runner.run; see README "How it fits together")."""

from __future__ import annotations

import argparse
import difflib
import logging
import math
import os
import shlex
import signal
import sys
import threading
from pathlib import Path
from typing import Any, NoReturn

from pipeline.backends import (
    BACKEND_CHOICES,
    DEVICES,
    EVAL_BACKENDS,
    INT8_PROFILES,
    MODELS,
    ONNX_RUNTIMES,
    PRECISIONS,
)
from pipeline.config import config_from_flags, flag_default
from pipeline.errors import PipelineError, UsageError
from pipeline.index import INDEX_KINDS
from pipeline.modes import (
    DISK_FULL,
    check_config,
    disk_full_said,
    interrupted_message,
    mark_started,
    unused_build_flags,
)
from pipeline.report import EXIT_FATAL, EXIT_USAGE, terminal_text

log = logging.getLogger("main")


def _int_at_least(minimum: int, maximum: int | None = None):
    """argparse type: a whole number >= minimum (and <= maximum), with a message that says so."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {v}")
        if maximum is not None and v > maximum:
            raise argparse.ArgumentTypeError(f"must be <= {maximum}, got {v}")
        return v

    return parse


_positive_int = _int_at_least(1)
MAX_TOP_K = 1000  # every item's top-k is held at once: 30 million asked of 12 photos took 8 GB and 4.5 minutes
_non_negative_int = _int_at_least(0)
_port = _int_at_least(1, 65535)


def _unit_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0.0 < v <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {v}")
    return v


def _words(text: str) -> str:
    """argparse type: a text query with something in it (an empty one would match nothing in particular)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("a text query must say something; got an empty text")
    return text


def _weight(text: str) -> float:
    """argparse type: a finite number >= 0 (a weight; what is to be taken away is a --negative-text)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(v) and v >= 0):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0 (to subtract a text, give it with "
                                         f"--negative-text), got {text}")
    return v


YOLO_BACKENDS = ["auto", "onnx", "torch"]
YOLO_BACKEND_HELP = (
    "auto: on the CPU, .pt weights run as their ONNX export (made once, verified, kept beside the weights)"
)


def _given(text: str) -> str:
    """argparse type: a name, path or column with something in it: an empty one ("$CLIP" unset in a
    script) named the current folder, or another mode, without a word."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty value names nothing; give one, or leave the flag out")
    return text


def _given_path(text: str) -> Path:
    return Path(_given(text))


# Options where an empty value means something: no filter, each photo, no metadata columns kept, the
# backend or model in use
EMPTY_MEANS_NONE = ("--filter", "--group-by", "--meta-columns", "--eval-backends", "--eval-models")


# What each option takes, as --help shows it (argparse's default is the option's name in capitals:
# --seg-imgsz SEG_IMGSZ said nothing of pixels, --seg-conf SEG_CONF nothing of its range)
METAVARS = {
    "text_weight": "W", "port": "PORT", "host": "HOST", "eval_backends": "B1,B2", "eval_models": "M1,M2",
    "eval_id_column": "COLUMN", "eval_cloth_column": "COLUMN", "dataset": "ID_OR_PATH", "split": "SPLIT",
    "config": "NAME", "limit": "N", "image_column": "COLUMN", "id_column": "COLUMN", "meta_columns": "C1,C2",
    "model": "MODEL", "onnx": "FILE", "batch_size": "N", "threads": "N", "ray_address": "ADDRESS",
    "video_clip": "NAME", "video_dir": "DIR", "frame_stride": "N", "det_model": "WEIGHTS", "det_conf": "0-1",
    "track_gap": "FRAMES", "seg_model": "WEIGHTS", "seg_conf": "0-1", "seg_imgsz": "PIXELS", "max_persons": "N",
    "output_dir": "DIR_OR_URL", "work_dir": "DIR", "top_k": "K", "max_matrix": "N", "max_result_images": "N",
    "filter": "EXPR", "group_by": "COLUMN", "shard_rows": "N",
}


def _add(group: Any, *names: str, **kw: Any) -> None:
    """An option whose default is its config field's (pipeline.config.FLAGS); a value it takes is
    refused when empty, unless an empty one means something (EMPTY_MEANS_NONE)."""
    dest = kw.get("dest") or names[0].lstrip("-").replace("-", "_")
    if dest in METAVARS:
        kw.setdefault("metavar", METAVARS[dest])
    if kw.get("action") != "store_true":
        kw.setdefault("default", flag_default(dest))
        if "choices" not in kw and names[0] not in EMPTY_MEANS_NONE:
            kw["type"] = {None: _given, Path: _given_path}.get(kw.get("type"), kw.get("type"))
    group.add_argument(*names, **kw)


def _add_mode_flags(p: argparse.ArgumentParser) -> None:
    """The reference modes, search and evaluation."""
    modes = p.add_argument_group("modes (reference flags)")
    _add(modes, "--use-embeddings", action="store_true", help="reuse embeddings/ and images/ from an earlier run")
    _add(
        modes,
        "--use-segmentation",
        action="store_true",
        help="one white-background crop per detected person; with --query-* or --serve: search the segmented "
        "gallery, each person of a query picture a query",
    )
    _add(modes, "--use-embedded-segment", action="store_true", help="reuse images_segment/ and embeddings_segment/")
    _add(
        modes,
        "--update",
        action="store_true",
        help="bring the gallery in --output-dir up to date with its dataset: embed only new and changed photos, "
        "reuse every unchanged vector, drop the photos that are gone",
    )
    _add(
        modes,
        "--export-onnx",
        action="store_true",
        help="export --model to --onnx (int8), with an fp32 file, the text tower and its tokenizer beside it, "
        "verified against torch",
    )

    search = p.add_argument_group("search and evaluation")
    _add(
        search,
        "--query-image",
        nargs="+",
        action="extend",  # given twice, both: the second used to replace the first without a word
        default=None,
        metavar="PATH",
        help="image files or folders to search the cached gallery with",
    )
    _add(search, "--query-text", nargs="+", action="extend", default=None, type=_words, metavar="TEXT",
         help='texts to search with, e.g. "red floral midi dress"; with --query-image, each picture and the '
         'texts make one query ("this dress, but in red")')
    _add(search, "--negative-text", nargs="+", action="extend", default=None, type=_words, metavar="TEXT",
         help='with --query-image: what the results should not have ("buttons"), subtracted from the query')
    _add(search, "--fusion", choices=("sum", "rrf"),
         help="how a picture and texts make one query: sum = weighted sum of the normalized vectors; rrf = "
         "reciprocal-rank fusion of their result lists")
    _add(search, "--text-weight", type=_weight,
         help="in a picture-plus-text sum: the texts' weight against the picture's 1")
    _add(search, "--export", dest="exports", action="append", metavar="KIND:DIR", default=None,
         help="export the store with its metadata to lancedb:DIR, qdrant:DIR (local mode) or parquet:DIR; "
         "again after --update, only what changed is written (repeatable)")
    _add(search, "--serve", action="store_true", help="a local search page over the cached gallery, and the report")
    _add(search, "--port", type=_port, help="with --serve")
    _add(search, "--host", help="with --serve (127.0.0.1: this machine only; any other address needs the token in "
         "$FASHION_SEARCH_TOKEN)")
    _add(search, "--no-auth", action="store_true",
         help="with --serve --host beyond loopback: serve without a token (anyone who reaches it can search)")
    _add(
        search,
        "--evaluate",
        action="store_true",
        help="measure Recall@1/5/10 and MRR against ground truth in --dataset",
    )
    _add(search, "--eval-backends", help=f"comma list of {','.join(EVAL_BACKENDS)} (default: the backend in use)")
    _add(search, "--eval-models", help="comma list of models evaluated side by side in one pass: short names ("
         + ", ".join(MODELS) + "), hub ids, folders, or exported .onnx files")
    _add(search, "--eval-id-column", help="same-product evaluation: column naming the product (e.g. item_ID)")
    _add(search, "--eval-cloth-column", help="person->garment evaluation: column with the garment image")



def _add_model_flags(p: argparse.ArgumentParser) -> None:
    """What is read and what embeds it."""
    data = p.add_argument_group("dataset")
    _add(data, "--dataset", help="hub id, local dataset folder/parquet file, or folder of images")
    _add(data, "--split", help="dataset split to read")
    _add(data, "--config", help="a hub dataset's configuration (subset) to read, where it has several")
    _add(data, "--limit", type=_non_negative_int, help="first N rows; 0 = all")
    _add(data, "--image-column", help="column holding the pictures")
    _add(data, "--id-column", help="column naming each photo for --update (default: a photo is known by its bytes)")
    _add(
        data,
        "--meta-columns",
        help="comma list of the dataset columns kept as metadata, for --filter and every hit (default: every "
        "column of plain values: text, numbers, true/false, dates)",
    )

    model = p.add_argument_group("model")
    _add(model, "--model", help="hub id, local folder or short name of a CLIP, SigLIP or open_clip model")
    _add(model, "--onnx", help="ONNX image encoder file")
    _add(
        model,
        "--backend",
        choices=BACKEND_CHOICES,
        help="auto: the ONNX file if it exists, else transformers",
    )
    _add(
        model,
        "--onnx-runtime",
        choices=ONNX_RUNTIMES,
        help="what runs the ONNX file: onnxruntime (the default), or openvino on the CPU (pip install openvino; "
        "the same file, faster for most towers on the CPU measured, its vectors within rounding of onnxruntime's: "
        "a store records which made it)",
    )
    _add(model, "--device", choices=DEVICES, help="auto: CUDA when torch sees a GPU, else the CPU")
    _add(
        model,
        "--precision",
        choices=PRECISIONS,
        help="torch backend: auto = fp32 on CPU, fp16 on CUDA (measured faster than bitsandbytes int8)",
    )
    _add(
        model,
        "--quantization",
        choices=["static", "static-qdq", "dynamic"],
        help="with --export-onnx: static (calibrated, batch-independent, saved as onnxruntime's CPU runs it), "
        "static-qdq (the same as portable QDQ, for runtimes such as OpenVINO) or dynamic",
    )
    _add(
        model,
        "--per-tensor",
        action="store_true",
        help="with --export-onnx: one int8 scale per weight tensor instead of per channel",
    )
    _add(
        model,
        "--int8-profile",
        choices=INT8_PROFILES,
        help="with --export-onnx --quantization static: the CPU kind the int8 graph is written for: amx (for a "
        "tower with GELUs: CLIP's, SigLIP's, open_clip's ViTs with their attention products in float, a ConvNeXt with "
        "its depthwise convolutions in float; the GELUs in uint8; less conversion where the int8 GEMMs are cheap: "
        "AMX, and Intel's other kernels), vnni (every tower's graph plain, the fastest on an AMD EPYC, but a "
        "ConvNeXt's depthwise convolutions in float, under the conversion bar there; a ResNet's graph is plain under "
        "either), auto (this CPU's kind: amx on a CPU with AMX and on an Intel CPU with AVX2 or more, vnni on "
        "others); every file runs on every CPU",
    )
    _add(
        model,
        "--decode",
        choices=["auto", "cpu", "cpu-simd", "device"],
        help="where JPEGs are decoded and preprocessed: cpu = Pillow decodes and resizes (CLIPImageProcessorPil's "
        "pixels); cpu-simd = Pillow decodes, torch's SIMD kernel resizes (transformers' default CLIPImageProcessor's "
        "pixels: 1.35 ms less a photo and core, after 1.5 s and 480 MiB to import torch); device = torchvision on "
        "the model's device; auto: on the GPU when the model runs there, else cpu; an update or a resume goes on as "
        "its store was made (other formats always on the CPU)",
    )
    _add(model, "--batch-size", type=_positive_int, help="pictures per model call")
    _add(model, "--threads", type=_non_negative_int, help="CPU threads for inference; 0 = all cores")
    _add(model, "--engine", choices=["local", "ray"], help="ray: build the gallery on Ray Data")
    _add(model, "--ray-address",
         help="a Ray cluster for --engine ray (auto: the one `ray start` left here); unset: $RAY_ADDRESS, "
              "else a new local Ray")



class _OneClip(argparse.Action):
    """--video_clip given twice, two clips, is refused: a run follows one clip (the second replaced
    the first without a word)."""

    def __call__(self, parser, namespace, values, option_string=None):
        before = getattr(namespace, self.dest, None)
        if before is not None and before != self.default and before != values:  # the same one twice: one clip
            parser.error(f"{option_string} given twice ({before}, {values}): a run follows one clip; run once for "
                         "each (the gallery is embedded once: --use-embeddings from the second run on)")
        setattr(namespace, self.dest, values)


def _add_person_flags(p: argparse.ArgumentParser) -> None:
    """Video and segmentation."""
    video = p.add_argument_group("video")
    _add(video, "--video_clip", "--video-clip", dest="video_clip", action=_OneClip,
         help="clip name: <video_dir>/<clip>.mp4")
    _add(video, "--video_dir", "--video-dir", dest="video_dir", type=Path, help="folder of the clips")
    _add(video, "--frame-stride", type=_positive_int, help="analyse every Nth frame")
    _add(video, "--det-model", help="person detector: Ultralytics weights (.pt), .onnx or .yaml")
    _add(video, "--det-conf", type=_unit_float, help="minimum detection confidence")
    _add(video, "--det-backend", choices=YOLO_BACKENDS, help=YOLO_BACKEND_HELP)
    _add(video, "--track-gap", type=_positive_int, help="analysed frames a person may go unseen before a track ends")
    _add(video, "--no-annotated-video", action="store_true", help="skip video_results/<clip>/annotated.mp4")

    seg = p.add_argument_group("segmentation (Ultralytics YOLO, person class)")
    _add(seg, "--seg-model", help="segmentation weights (.pt), exported .onnx, or model .yaml")
    _add(seg, "--seg-conf", type=_unit_float, help="minimum person confidence")
    _add(seg, "--seg-imgsz", type=_positive_int, help="inference size")
    _add(seg, "--seg-backend", choices=YOLO_BACKENDS, help=YOLO_BACKEND_HELP)
    _add(seg, "--keep-unsegmented", action="store_true", help="keep the whole image when no person is found")
    _add(
        seg,
        "--max-persons",
        type=_positive_int,
        help="persons kept per catalogue or query photo, the most confident (the summary counts photos that had "
        "more); video frames are not capped",
    )



def _add_output_flags(p: argparse.ArgumentParser) -> None:
    """Where outputs go, and how much is said."""
    out = p.add_argument_group("output")
    _add(
        out,
        "--output-dir",
        help="where images/, embeddings/, ... are written: a folder, or an fsspec URL (s3://bucket/run needs s3fs)",
    )
    _add(
        out,
        "--work-dir",
        type=Path,
        help="with a URL --output-dir: its local working copy (default: one per URL in ~/.cache/fashion-visual-search)",
    )
    _add(out, "--top-k", type=_int_at_least(1, MAX_TOP_K), help=f"matches per item or query (at most {MAX_TOP_K:,})")
    _add(out, "--max-matrix", type=_non_negative_int, help="save the N x N distance matrix only when N <= this")
    _add(out, "--max-result-images", type=_non_negative_int, help="cap on result pictures (neighbours.csv: all)")
    _add(
        out,
        "--filter",
        help="metadata filter inside the search, SQL-like: \"category = 'dress' AND price < 50\" "
        "(= != < <= > >=, IN (...), IS NULL, AND OR NOT, parentheses); in a gallery run each item's neighbours "
        "come from the items it keeps, in --evaluate it chooses the rows evaluated",
    )
    _add(
        out,
        "--group-by",
        help="one result per value of this metadata column (a product id): scored by its best photo, filled until "
        "k products; an item's neighbours are never other photos of its product; in --evaluate the ranks count "
        "products",
    )
    _add(
        out,
        "--dedup",
        action="store_true",
        help="one photo per duplicate group (outputs/duplicates.csv) in search results and neighbours",
    )
    _add(
        out,
        "--index",
        choices=INDEX_KINDS,
        help="nearest-neighbour index: auto = exact up to 50,000 items, FAISS IVF-PQ above; none = exact",
    )
    _add(out, "--shard-rows", type=_positive_int, help="rows per resumable shard")
    _add(out, "--fresh", action="store_true", help="discard the shards of an interrupted run instead of resuming")

    verbosity = p.add_mutually_exclusive_group()
    verbosity.add_argument(
        "-v", "--verbose", action="store_true", help="debug logging, tracebacks and the CPU in the summary"
    )
    verbosity.add_argument(
        "-q", "--quiet", action="store_true", help="warnings, errors and failed items only: no progress bars or summary"
    )


EPILOG = """examples:
  python main.py --dataset ./my_catalogue --limit 0        embed every photo, then neighbours, pictures, report
  python main.py --query-text "red floral midi dress"      search the gallery built before
  python main.py --video_clip clip_1 --video_dir videos    follow the people in videos/clip_1.mp4

exit codes: 0 all went well; 1 a fatal error; 2 bad or contradictory flags; 3 finished, some items failed"""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown where they say something: not for switches (off), empty lists or unset values, and
    not twice where the help text already names its default; the epilog keeps its lines."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        # by identity for None and False: a default of 0 (--threads) equals False, and is worth showing
        if action.default is None or action.default is False or action.default in ((), "", argparse.SUPPRESS) or (
                "default" in text):
            return text
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """A usage error is one line (the reason, and the closest flag to a misspelled one), not the usage block."""

    def error(self, message: str) -> NoReturn:
        if message.startswith("unrecognized arguments:"):
            flags = [a for s in self._actions for a in s.option_strings]
            hints = [
                f"{word}: did you mean {close[0]}?"
                for word in message.split(":", 1)[1].split()
                if word.startswith("-") and (close := difflib.get_close_matches(word.split("=")[0], flags, n=1))
            ]
            message = "; ".join([message, *hints])
        # a message that points at a place ends with its caret: the hint would be glued onto it
        hint = "" if "\n" in message else f" (python {self.prog} --help lists every flag)"
        self.exit(2, f"{self.prog}: error: {message}{hint}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="main.py",
        usage="python main.py [a mode flag] [options]   (no mode flag: build the gallery and its neighbours)",
        allow_abbrev=False,  # --lim 5 taken as --limit: a flag added later could change what a script meant
        description="Fashion visual search: embed a catalogue, find look-alikes, match people in videos.",
        formatter_class=_HelpFormatter,
        epilog=EPILOG,
    )

    _add_mode_flags(p)
    _add_model_flags(p)
    _add_person_flags(p)
    _add_output_flags(p)
    return p


def _flag_names(parser: argparse.ArgumentParser, dests: set[str]) -> str:
    """The flags as the user types them (--frame-stride, --video_dir), for messages."""
    spelled = {a.dest: a.option_strings[0] for a in parser._actions if a.option_strings}  # noqa: SLF001
    return ", ".join(spelled.get(d, "--" + d) for d in sorted(dests))


def explicit_options(parser: argparse.ArgumentParser, argv: list[str]) -> frozenset[str]:
    """Names of the options the user typed (so cache checks compare requests, not defaults)."""
    shadow = argparse.ArgumentParser(add_help=False)
    for action in parser._actions:  # noqa: SLF001 - argparse has no public listing
        if action.option_strings and action.dest != "help":
            kwargs: dict[str, Any] = {"dest": action.dest, "default": argparse.SUPPRESS}
            if action.nargs == 0:
                kwargs["action"] = "store_const"
                kwargs["const"] = True
            else:
                kwargs["nargs"] = action.nargs
            shadow.add_argument(*action.option_strings, **kwargs)
    ns, _ = shadow.parse_known_args(argv)
    return frozenset(vars(ns))


# What a gallery run is made with: a search mode's "build it first" command repeats those the user typed.
GALLERY_MAKING = ("dataset", "split", "config", "limit", "image_column", "id_column", "meta_columns", "model", "onnx",
                  "backend", "onnx_runtime", "device", "precision", "decode", "batch_size", "threads", "engine",
                  "ray_address", "seg_model", "seg_conf", "seg_imgsz", "seg_backend", "keep_unsegmented",
                  "max_persons", "work_dir", "index", "shard_rows")


def gallery_flags(parser: argparse.ArgumentParser, args: argparse.Namespace,
                  explicit: frozenset[str]) -> tuple[str, ...]:
    """The gallery-making options the user typed, as command-line words (quoted for a shell)."""
    words: list[str] = []
    for action in parser._actions:  # noqa: SLF001 - argparse has no public listing
        if action.dest not in GALLERY_MAKING or action.dest not in explicit:
            continue
        value = getattr(args, action.dest)
        if action.nargs == 0:
            words.append(action.option_strings[0])
        elif value is not None:
            words += [action.option_strings[0], shlex.quote(str(value))]
    return tuple(words)


ROOT_LOGGING_LIBRARIES = (f"{os.sep}open_clip{os.sep}",)  # log their INFO lines on the root logger ("INFO root:")


def _not_a_librarys_root_info(record: logging.LogRecord) -> bool:
    return not (record.name == "root" and record.levelno < logging.WARNING
                and any(part in record.pathname for part in ROOT_LOGGING_LIBRARIES))


def say(text: str, stream=None) -> None:
    """A line for the operator's terminal (stderr unless given): a file's or a column's name that
    holds control characters is printed as their escapes, not run by the terminal."""
    print(terminal_text(text), file=stream or sys.stderr)


class _TerminalFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return terminal_text(super().format(record))


def configure_logging(verbose: bool, quiet: bool) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr, force=True)
    for handler in logging.getLogger().handlers:  # a name in a warning is not run by the terminal either
        handler.setFormatter(_TerminalFormatter("%(levelname)s %(name)s: %(message)s"))
    if quiet:  # the hub's and transformers' own bars (downloads, "Loading weights") follow -q too
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    if not verbose:
        for noisy in (
            "httpx",
            "httpx2",
            "urllib3",
            "filelock",
            "datasets",
            "huggingface_hub",
            "PIL",
            "matplotlib",
            "onnx_ir",
            "onnxscript",
            "faiss",
            "s3fs",
            "fsspec",
            "gcsfs",
            "adlfs",
        ):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        for handler in logging.getLogger().handlers:  # open_clip says what it loads on the root logger
            handler.addFilter(_not_a_librarys_root_info)
    # Even with -v: faiss's loader reports failing to load per-SIMD libraries that today's single-library
    # wheels do not have; index.py says instead which build runs.
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    # Even with -v: botocore's debug log writes each request's signed headers, the session token among
    # them (a -v log pasted into a bug report), and its INFO says where it found the credentials
    for cloud in ("botocore", "aiobotocore", "boto3", "s3transfer", "google.auth", "azure"):
        logging.getLogger(cloud).setLevel(logging.WARNING)


class Terminated(KeyboardInterrupt):
    """SIGTERM (kill, timeout, docker stop, a batch system's time limit, a spot machine taken back),
    taken as Ctrl-C is: the work done is kept (and at a URL sent), the run says how to go on, exit 143.
    It ended the process outright, sending nothing: a resume from another machine started over."""


def _terminated(signum: int, frame: Any) -> NoReturn:
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        explicit = explicit_options(parser, argv)
        cfg = config_from_flags(vars(args), explicit, progress=not args.quiet,
                                gallery_flags=gallery_flags(parser, args, explicit))
        problem = check_config(cfg, lambda dests: _flag_names(parser, dests))
        if problem:
            parser.error(problem)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2)
        return int(e.code or 0)
    configure_logging(args.verbose, args.quiet)
    on_term = signal.signal(signal.SIGTERM, _terminated) if threading.current_thread() is threading.main_thread() \
        else None
    try:
        try:
            from pipeline.runner import run

            mark_started()
            unused = unused_build_flags(cfg, lambda dests: _flag_names(parser, dests))
            if unused:  # a build's command with a query added: taken, and said
                log.warning("%s", unused)
            summary = run(cfg)
            if unused:
                summary.notes.append(unused)
        except UsageError as e:
            say(f"error: {e}")
            return EXIT_USAGE
        except PipelineError as e:
            if args.verbose:
                log.exception("fatal")
            say(f"error: {disk_full_said(str(e), e.__cause__, cfg)}")
            return EXIT_FATAL
        except KeyboardInterrupt as e:
            say(interrupted_message(cfg))
            return 143 if isinstance(e, Terminated) else 130
        except Exception as e:  # an unexpected bug: one line unless -v
            if args.verbose:
                log.exception("unexpected error")
            if isinstance(e, OSError) and e.errno in DISK_FULL:  # not a bug: said with what it left and how to go on
                where = f" writing {e.filename}" if e.filename else ""
                say(f"error: {disk_full_said(f'{e.strerror}{where}', e, cfg)}")
                return EXIT_FATAL
            say(f"error: unexpected {type(e).__name__}: {e} (run with -v for the traceback)")
            return EXIT_FATAL
        if not args.quiet:
            say(summary.format(verbose=args.verbose), sys.stdout)
        elif summary.failures:  # -q: errors only, and a failed item is one
            say("\n".join(summary.failure_lines()))
        return summary.exit_code
    finally:
        if on_term is not None:  # a caller's own handler back (tests call main in-process)
            signal.signal(signal.SIGTERM, on_term)


if __name__ == "__main__":
    sys.exit(main())
