"""Fashion visual-search pipeline: command line. Parses and validates flags, then dispatches to one
mode function in pipeline/ (see README "How it fits together")."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from pipeline.config import DEFAULT_DATASET, DEFAULT_MODEL, DEFAULT_ONNX, DEFAULT_DET_MODEL, DEFAULT_SEG_MODEL, RunConfig, SegmentSpec
from pipeline.dataset import DatasetSpec
from pipeline.embedders import EmbedderSpec
from pipeline.errors import PipelineError, UsageError
from pipeline.report import EXIT_FATAL, EXIT_USAGE

log = logging.getLogger("main")


def _int_at_least(minimum: int):
    """argparse type: a whole number >= minimum, with a message that says so."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {v}")
        return v

    return parse


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


def _unit_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0.0 < v <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {v}")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="main.py",
        description="Fashion visual search: embed a catalogue, find look-alikes, match people in videos.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    modes = p.add_argument_group("modes (reference flags)")
    modes.add_argument("--use-embeddings", action="store_true", help="reuse embeddings/ and images/ from an earlier run")
    modes.add_argument("--use-segmentation", action="store_true", help="one white-background crop per detected person")
    modes.add_argument("--use-embedded-segment", action="store_true", help="reuse images_segment/ and embeddings_segment/")
    modes.add_argument("--export-onnx", action="store_true", help="export --model to --onnx (int8) and an fp32 file beside it, verified against torch")

    search = p.add_argument_group("search and evaluation")
    search.add_argument("--query-image", nargs="+", metavar="PATH", help="image files or folders to search the cached gallery with")
    search.add_argument("--query-text", nargs="+", metavar="TEXT", help='texts to search with, e.g. "red floral midi dress"')
    search.add_argument("--evaluate", action="store_true", help="measure Recall@1/5/10 and MRR against ground truth in --dataset")
    search.add_argument("--eval-backends", default=None, help="comma list of torch,onnx-fp32,onnx-int8 (default: the backend in use)")
    search.add_argument("--eval-id-column", default=None, help="same-product evaluation: column naming the product (e.g. item_ID)")
    search.add_argument("--eval-cloth-column", default="cloth", help="person->garment evaluation: column with the garment image")

    data = p.add_argument_group("dataset")
    data.add_argument("--dataset", default=DEFAULT_DATASET, help="hub id, local dataset folder/parquet file, or folder of images")
    data.add_argument("--split", default="train")
    data.add_argument("--limit", type=_non_negative_int, default=10000, help="first N rows; 0 = all")
    data.add_argument("--image-column", default="image")

    model = p.add_argument_group("model")
    model.add_argument("--model", default=DEFAULT_MODEL, help="hub id or local folder of a CLIP model")
    model.add_argument("--onnx", default=DEFAULT_ONNX, help="ONNX image encoder file")
    model.add_argument("--backend", choices=["auto", "onnx", "torch"], default="auto", help="auto: the ONNX file if it exists, else transformers")
    model.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    model.add_argument("--precision", choices=["auto", "fp32", "fp16", "int8"], default="auto", help="torch backend: auto = fp32 on CPU, fp16 on CUDA (measured faster than bitsandbytes int8)")
    model.add_argument("--quantization", choices=["static", "dynamic"], default="static", help="with --export-onnx: static QDQ (calibrated, batch-independent) or dynamic")
    model.add_argument("--per-tensor", action="store_true", help="with --export-onnx: one int8 scale per weight tensor instead of per channel")
    model.add_argument("--batch-size", type=_positive_int, default=32)
    model.add_argument("--threads", type=_non_negative_int, default=0, help="CPU threads for inference; 0 = all cores")

    video = p.add_argument_group("video")
    video.add_argument("--video_clip", "--video-clip", dest="video_clip", default=None, help="clip name: <video_dir>/<clip>.mp4")
    video.add_argument("--video_dir", "--video-dir", dest="video_dir", type=Path, default=Path("videos"))
    video.add_argument("--frame-stride", type=_positive_int, default=30, help="analyse every Nth frame")
    video.add_argument("--det-model", default=DEFAULT_DET_MODEL, help="person detector: Ultralytics weights (.pt), .onnx or .yaml")
    video.add_argument("--det-conf", type=_unit_float, default=0.25, help="minimum detection confidence")
    video.add_argument("--det-backend", choices=["auto", "onnx", "torch"], default="auto",
                       help="auto: on the CPU, .pt weights run as their ONNX export (made once, verified, kept beside the weights)")

    seg = p.add_argument_group("segmentation (Ultralytics YOLO, person class)")
    seg.add_argument("--seg-model", default=DEFAULT_SEG_MODEL, help="segmentation weights (.pt), exported .onnx, or model .yaml")
    seg.add_argument("--seg-conf", type=_unit_float, default=0.25, help="minimum person confidence")
    seg.add_argument("--seg-imgsz", type=_positive_int, default=640, help="inference size")
    seg.add_argument("--seg-backend", choices=["auto", "onnx", "torch"], default="auto",
                     help="auto: on the CPU, .pt weights run as their ONNX export (made once, verified, kept beside the weights)")
    seg.add_argument("--keep-unsegmented", action="store_true", help="keep the whole image when no person is found")

    out = p.add_argument_group("output")
    out.add_argument("--output-dir", type=Path, default=Path("."), help="where images/, embeddings/, ... are written")
    out.add_argument("--top-k", type=_positive_int, default=5)
    out.add_argument("--max-matrix", type=_non_negative_int, default=20000, help="save the N x N distance matrix only when N <= this")
    out.add_argument("--max-result-images", type=_non_negative_int, default=None, help="cap on result pictures (default: one per image)")
    out.add_argument("--shard-rows", type=_positive_int, default=512, help="rows per resumable shard")
    out.add_argument("--fresh", action="store_true", help="discard the shards of an interrupted run instead of resuming")

    verbosity = p.add_mutually_exclusive_group()
    verbosity.add_argument("-v", "--verbose", action="store_true", help="debug logging and tracebacks")
    verbosity.add_argument("-q", "--quiet", action="store_true", help="errors only, no progress bars or summary")
    return p


def _flag_names(parser: argparse.ArgumentParser, dests: set[str]) -> str:
    """The flags as the user types them (--frame-stride, --video_dir), for messages."""
    spelled = {a.dest: a.option_strings[0] for a in parser._actions if a.option_strings}  # noqa: SLF001
    return ", ".join(spelled.get(d, "--" + d) for d in sorted(dests))


def validate(args: argparse.Namespace, parser: argparse.ArgumentParser, explicit: frozenset[str]) -> None:
    """Refuse contradictory flags (parser.error exits with code 2)."""
    cache_flags = [f for f in ("use_embeddings", "use_embedded_segment") if getattr(args, f)]
    if len(cache_flags) > 1:
        parser.error("--use-embeddings and --use-embedded-segment contradict: pick the cache to reuse")
    if args.use_embeddings and args.use_segmentation:
        parser.error("--use-embeddings reuses whole-image embeddings; for segmented crops use --use-embedded-segment")
    if args.use_embedded_segment and args.use_segmentation:
        parser.error("--use-embedded-segment already means segmentation; drop --use-segmentation to reuse the cache, or drop --use-embedded-segment to rebuild it")
    others = [f for f in ("use_embeddings", "use_segmentation", "use_embedded_segment") if getattr(args, f)]
    if args.export_onnx and others:
        parser.error("--export-onnx makes the ONNX file and stops; run the pipeline as a second command")
    if ({"per_tensor", "quantization"} & explicit) and not args.export_onnx:
        parser.error("--per-tensor and --quantization only apply to --export-onnx")
    query = bool(args.query_image or args.query_text)
    exclusive = [name for name, on in (("--export-onnx", args.export_onnx), ("--video_clip", bool(args.video_clip)),
                                       ("--query-image/--query-text", query), ("--evaluate", args.evaluate)) if on]
    if len(exclusive) > 1:
        parser.error(f"{' and '.join(exclusive)} are separate modes: run them as separate commands")
    if args.evaluate and (args.use_embeddings or args.use_embedded_segment):
        parser.error("--evaluate embeds the dataset itself; it does not read a cache")
    eval_flags = {"eval_backends", "eval_id_column", "eval_cloth_column"} & explicit
    if eval_flags and not args.evaluate:
        parser.error(f"{_flag_names(parser, eval_flags)} need --evaluate")
    if args.eval_backends:
        bad = [b for b in args.eval_backends.split(",") if b not in ("torch", "onnx-fp32", "onnx-int8")]
        if bad:
            parser.error(f"--eval-backends: unknown {bad}; choose from torch, onnx-fp32, onnx-int8")
    video_flags = {"video_dir", "frame_stride", "det_model", "det_conf", "det_backend"} & explicit
    if video_flags and not args.video_clip:
        parser.error(f"{_flag_names(parser, video_flags)} need --video_clip NAME")
    if args.video_clip and args.export_onnx:
        parser.error("--export-onnx makes the ONNX file and stops; run the video as a second command")
    seg_flags = {"seg_model", "seg_conf", "seg_imgsz", "seg_backend", "keep_unsegmented"} & explicit
    if seg_flags and not (args.use_segmentation or args.use_embedded_segment):
        parser.error(f"{_flag_names(parser, seg_flags)} need --use-segmentation or --use-embedded-segment")
    if args.fresh and (args.use_embeddings or args.use_embedded_segment):
        parser.error("--fresh rebuilds the gallery; it cannot be combined with a cache flag")
    if args.backend == "onnx" and args.precision != "auto":
        parser.error("--precision applies to the torch backend; the ONNX file's precision is fixed when it is exported")
    if args.device == "cpu" and args.precision in ("fp16", "int8"):
        parser.error(f"--precision {args.precision} needs --device cuda (on CPU use the int8 ONNX file)")


def explicit_options(parser: argparse.ArgumentParser, argv: list[str]) -> frozenset[str]:
    """Names of the options the user typed (so cache checks compare requests, not defaults)."""
    shadow = argparse.ArgumentParser(add_help=False)
    for action in parser._actions:  # noqa: SLF001 - argparse has no public listing
        if action.option_strings and action.dest != "help":
            kwargs = {"dest": action.dest, "default": argparse.SUPPRESS}
            if action.nargs == 0:
                kwargs["action"] = "store_const"
                kwargs["const"] = True
            else:
                kwargs["nargs"] = action.nargs
            shadow.add_argument(*action.option_strings, **kwargs)
    ns, _ = shadow.parse_known_args(argv)
    return frozenset(vars(ns))


# RunConfig fields that take the flag of the same name unchanged.
_SAME_NAME = (
    "output_dir", "batch_size", "top_k", "max_matrix", "max_result_images", "shard_rows", "use_embeddings",
    "use_segmentation", "use_embedded_segment", "fresh", "video_clip", "video_dir", "frame_stride",
    "det_model", "det_conf", "det_backend",
)


def config_from_args(args: argparse.Namespace, explicit: frozenset[str]) -> RunConfig:
    return RunConfig(
        dataset=DatasetSpec(args.dataset, args.split, args.limit or None, args.image_column),
        embedder=EmbedderSpec(
            model=args.model, onnx=args.onnx, backend=args.backend, device=args.device,
            precision=args.precision, threads=args.threads,
        ),
        segment=SegmentSpec(model=args.seg_model, conf=args.seg_conf, imgsz=args.seg_imgsz, keep_unsegmented=args.keep_unsegmented, backend=args.seg_backend),
        progress=not args.quiet,
        explicit=explicit,
        **{name: getattr(args, name) for name in _SAME_NAME},
    )


def configure_logging(verbose: bool, quiet: bool) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr, force=True)
    if quiet:  # the hub's and transformers' own bars (downloads, "Loading weights") follow -q too
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    if not verbose:
        for noisy in ("httpx", "httpx2", "urllib3", "filelock", "datasets", "huggingface_hub", "PIL", "matplotlib", "onnx_ir", "onnxscript"):
            logging.getLogger(noisy).setLevel(logging.WARNING)


def dispatch(cfg: RunConfig, args: argparse.Namespace):
    """Pick the mode function for this configuration."""
    from pipeline import runner

    if args.export_onnx:
        return runner.run_export(cfg, per_tensor=args.per_tensor, quantization=args.quantization)
    with runner.output_session(cfg):
        if cfg.video_clip:
            from pipeline.video import run_video

            return run_video(cfg)
        if args.query_image or args.query_text:
            from pipeline.search import run_query

            return run_query(cfg, args.query_image or [], args.query_text or [])
        if args.evaluate:
            from pipeline.search import run_evaluate

            backends = args.eval_backends.split(",") if args.eval_backends else [
                "onnx-int8" if cfg.embedder.resolve_backend() == "onnx" else "torch"
            ]
            return run_evaluate(cfg, backends, args.eval_id_column, args.eval_cloth_column)
        return runner.run_gallery(cfg)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        explicit = explicit_options(parser, argv)
        validate(args, parser, explicit)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2)
        return int(e.code or 0)
    configure_logging(args.verbose, args.quiet)
    cfg = config_from_args(args, explicit)
    try:
        summary = dispatch(cfg, args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except PipelineError as e:
        if args.verbose:
            log.exception("fatal")
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FATAL
    except KeyboardInterrupt:
        print("interrupted: complete shards are kept; run the same command again to resume", file=sys.stderr)
        return 130
    except Exception as e:  # an unexpected bug: one line unless -v
        if args.verbose:
            log.exception("unexpected error")
        print(f"error: unexpected {type(e).__name__}: {e} (run with -v for the traceback)", file=sys.stderr)
        return EXIT_FATAL
    if not args.quiet:
        print(summary.format(verbose=args.verbose))
    return summary.exit_code


if __name__ == "__main__":
    sys.exit(main())
