"""The modes of the command line, each declared once: what selects it, the options only it takes,
what it refuses, whether it holds the output folder, and the function that runs it.

`main.py` checks the flags with `check_config` and `runner.run` dispatches with `selected_mode`, both
from `MODES`. Adding a mode is one module with its run function (RunConfig -> RunSummary) and one
entry here. Run functions are named, not imported, so `main.py --help` loads no model code.
"""

from __future__ import annotations

import errno
import importlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .backends import BACKENDS, EVAL_BACKENDS, ONNXRUNTIME, is_onnx_file
from .config import RunConfig
from .report import RunSummary

# A refusal: when the predicate holds for the configuration, the message says why and what to do.
Check = tuple[Callable[[RunConfig], bool], str]


@dataclass(frozen=True)
class Mode:
    """One mode of main.py.

    name: for messages and the summary. flag: the option that selects it, as typed.
    selected: whether a configuration asks for it. run: "module:function" of its run function.
    options: argparse dests that only this mode takes (refused without it).
    checks: combinations it refuses. engines: the --engine values it runs under.
    holds_output: holds --output-dir's lock for the run (a mode that only reads does not).
    mirrors_output: with a URL --output-dir, works in its local copy, fetched before and sent after.
    sends_output: with a URL, sends what it changed there after the run (a mode that only reads it sends
    nothing, and needs only read access: a serving node's read-only credentials).
    """

    name: str
    flag: str
    selected: Callable[[RunConfig], bool]
    run: str
    options: frozenset[str] = frozenset()
    checks: tuple[Check, ...] = ()
    engines: tuple[str, ...] = ("local",)
    holds_output: bool = True
    mirrors_output: bool = True
    sends_output: bool = True

    def load(self) -> Callable[[RunConfig], RunSummary]:
        module, _, function = self.run.partition(":")
        return getattr(importlib.import_module(module), function)


def _unknown_backends(cfg: RunConfig) -> list[str]:
    return [b for b in cfg.evaluate.backends if b not in EVAL_BACKENDS]


_VIDEO_OPTIONS = {"video_dir", "frame_stride", "det_model", "det_conf", "det_backend", "track_gap",
                  "no_annotated_video"}
_PROFILE_IS_STATIC = ("--int8-profile chooses the graph of --quantization static (the default); "
                      "{quantization} files have one graph for every CPU")
_EXPORT_STOPS = "--export-onnx makes the ONNX file and stops; run the pipeline as a second command"
_EXPORT_WRITES_ONNX = (
    "--export-onnx writes where --onnx says (its text tower and tokenizer beside it), not in --output-dir: "
    "drop --output-dir, or name the file with --onnx DIR/NAME_int8.onnx"
)
_EXPORT_TAKES_NO_PRECISION = (
    "--export-onnx reads the model's fp32 weights with torch and writes an int8 file and its fp32 twin: "
    "--precision and --backend do not apply to it (drop them; --quantization and --int8-profile choose the int8)"
)
_EVAL_READS_NO_CACHE = "--evaluate embeds the dataset itself; it does not read a cache"
_EVAL_UNKNOWN = "--eval-backends: unknown {unknown}; choose from " + ", ".join(EVAL_BACKENDS)
_EVAL_CHECKS: tuple[Check, ...] = (
    (lambda c: c.from_cache, _EVAL_READS_NO_CACHE),
    (lambda c: bool(_unknown_backends(c)), _EVAL_UNKNOWN),
    (lambda c: bool(c.evaluate.models and c.evaluate.backends),
     "--eval-models and --eval-backends: name each model's backend in --eval-models instead (an exported .onnx "
     "file runs on onnxruntime, or OpenVINO with --onnx-runtime openvino; anything else on torch)"),
    (lambda c: bool(c.evaluate.models) and bool({"model", "onnx", "backend"} & c.explicit),
     "--eval-models names every model compared (each .onnx file runs on onnxruntime, or OpenVINO with "
     "--onnx-runtime openvino; anything else on torch): "
     "drop --model, --onnx and --backend, or add that model to --eval-models"),
    (lambda c: len(set(c.evaluate.models)) < len(c.evaluate.models),
     "--eval-models names {twice} more than once: each model is one row of the comparison; name it once"),
    (lambda c: bool(c.evaluate.id_column) and "eval_cloth_column" in c.explicit,
     "--eval-id-column scores same-product retrieval, --eval-cloth-column person -> garment: choose one"),
    (lambda c: c.dedup,
     "--dedup hides copies in search results; --evaluate already counts byte-identical pictures as one right "
     "answer, and a duplicate group is no product: drop it (or --group-by a product column)"),
)

# At most one mode besides the gallery may be selected (check_config); the gallery runs when no other is.
MODES: tuple[Mode, ...] = (
    Mode("export-onnx", "--export-onnx", lambda c: c.export.enabled, "pipeline.runner:run_export",
         options=frozenset({"per_tensor", "quantization", "int8_profile"}),
         checks=((lambda c: c.from_cache or c.use_segmentation, _EXPORT_STOPS),
                 (lambda c: "output_dir" in c.explicit, _EXPORT_WRITES_ONNX),
                 (lambda c: "int8_profile" in c.explicit and c.export.quantization != "static", _PROFILE_IS_STATIC),
                 (lambda c: bool({"precision", "backend"} & c.explicit), _EXPORT_TAKES_NO_PRECISION),
                 (lambda c: not str(c.embedder.onnx).lower().endswith(".onnx") and not Path(c.embedder.onnx).is_dir(),
                  "--export-onnx writes --onnx {onnx} and its fp32 and text files beside it, named from it: give it "
                  "the .onnx suffix ({onnx}.onnx), as the runs that read them look for it"),
                 (lambda c: Path(c.embedder.onnx).stem.lower().endswith("_fp32"),
                  "--export-onnx writes the int8 file at --onnx {onnx}, and its fp32 twin beside it: a name ending "
                  "in _fp32 would hold the int8 file and read as the fp32 one. Name the int8 file (…_int8.onnx)"),
                 (lambda c: c.embedder.device == "cuda",
                  "--export-onnx exports, quantizes and verifies on the CPU, for the CPU: drop --device cuda (a "
                  "GPU runs the file with onnxruntime-gpu, or the model itself with --backend torch)"),
                 (lambda c: "onnx_runtime" in c.explicit,
                  "--export-onnx writes the file, which every runtime reads; --onnx-runtime says what runs it: give "
                  "it to the runs that embed with the file")),
         holds_output=False, mirrors_output=False),
    Mode("video", "--video_clip", lambda c: bool(c.video.clip), "pipeline.video:run_video",
         options=frozenset(_VIDEO_OPTIONS)),
    Mode("query", "--query-image/--query-text", lambda c: c.query.active, "pipeline.search:run_query"),
    Mode("export", "--export", lambda c: bool(c.exports), "pipeline.vectordb:run_export_db", holds_output=False,
         sends_output=False),
    Mode("evaluate", "--evaluate", lambda c: c.evaluate.enabled, "pipeline.search:run_evaluate",
         options=frozenset({"eval_backends", "eval_models", "eval_id_column", "eval_cloth_column"}),
         checks=_EVAL_CHECKS),
    # --serve reads only: the output folder stays free for other runs. Like the queries, it reads the
    # segmented gallery with --use-segmentation or --use-embedded-segment alike.
    Mode("serve", "--serve", lambda c: c.serve.enabled, "pipeline.serve:run_serve",
         options=frozenset({"port", "host", "no_auth"}), holds_output=False, sends_output=False),
    Mode("gallery", "", lambda c: True, "pipeline.runner:run_gallery", engines=("local", "ray")),
)  # fmt: skip

# Modes that never search the catalogue: --filter and --group-by would be silently ignored there.
_NO_SEARCH_OPTIONS = frozenset({"export-onnx", "export"})
_SEGMENT_OPTIONS = frozenset({"seg_model", "seg_conf", "seg_imgsz", "seg_backend", "keep_unsegmented", "max_persons"})

# Checks that hold whatever the mode; the first list before the modes' own, the second after.
_BEFORE: tuple[Check, ...] = (
    (
        lambda c: is_onnx_file(c.embedder.model),
        "--model {model} is an exported ONNX file: give it with --onnx {model} (--model names a model: a folder, a "
        "hub id or a short name)",  # read as a folder's config.json, it was "not a valid JSON file ... check the path"
    ),
    (
        lambda c: c.use_embeddings and c.use_embedded_segment,
        "--use-embeddings and --use-embedded-segment contradict: pick the cache to reuse",
    ),
    (
        lambda c: c.use_embeddings and c.use_segmentation,
        "--use-embeddings reuses whole-image embeddings; for segmented crops use --use-embedded-segment",
    ),
    (
        lambda c: c.use_embedded_segment and c.use_segmentation,
        "--use-embedded-segment already means segmentation; drop --use-segmentation to reuse the cache, "
        "or drop --use-embedded-segment to rebuild it",
    ),
)
# What only a build of the store uses: a mode that reads a store (--query-*, --serve, --export) would ignore it
_BUILD_OPTIONS = frozenset({"shard_rows", "fresh", "meta_columns"})

def unused_build_flags(cfg: RunConfig, spell: Callable[[set[str]], str]) -> str | None:
    """What a search, --serve or --export is told of the build's flags it was given (the build's
    command with a query added: taken, not refused, but not used without a word); None otherwise."""
    if not cfg.searches_only:
        return None
    unused = set(_BUILD_OPTIONS & cfg.explicit) | ({"index"} if cfg.index not in ("auto", "none") else set())
    if not unused:
        return None
    return (f"{spell(unused)} {'is' if len(unused) == 1 else 'are'} a gallery run's, not used here: "
            f"{selected_mode(cfg).flag} reads the store as it was built"
            + (", with the index beside it (or exactly, with --index none)" if "index" in unused else ""))


_AFTER: tuple[Check, ...] = (
    (
        lambda c: c.dataset.config is not None and Path(c.dataset.name).exists(),
        "--config picks a configuration of a hub dataset; --dataset {dataset} is a local folder or file, read as it "
        "is: point --dataset at that configuration's files",
    ),
    (
        lambda c: c.update and c.from_cache,
        "--update brings the store up to date; a cache flag reuses it as it is: choose one",
    ),
    (lambda c: c.update and c.fresh, "--update keeps what it can; --fresh discards everything: choose one"),
    (
        lambda c: c.update and selected_mode(c).name != "gallery",
        "--update is a gallery run of its own: update first, then search or play the video as a second command",
    ),
    (
        lambda c: "work_dir" in c.explicit and not c.output_url,
        "--work-dir is the working copy of an --output-dir URL (s3://...); with a folder it is not used",
    ),
    (lambda c: "ray_address" in c.explicit and c.engine != "ray", "--ray-address needs --engine ray"),
    (
        lambda c: c.engine == "ray" and c.from_cache,
        "--engine ray builds a gallery; a cache flag reuses one and builds nothing: drop --engine ray",
    ),
    (
        lambda c: c.engine == "ray" and c.embedder.decode == "device",
        "--decode device decodes on the model's GPU; Ray's workers decode on the CPU (Pillow's pixels): drop "
        "--engine ray for it, or --decode device for Ray",
    ),
    (
        lambda c: bool(c.filter or c.group_by or c.dedup) and selected_mode(c).name in _NO_SEARCH_OPTIONS,
        "{search_flags} only {search_verb} searches ({searches}); {mode_flag} does not search the catalogue, "
        "so it would ignore {them}: drop {them}",
    ),
    (
        lambda c: c.fresh and c.from_cache,
        "--fresh rebuilds the gallery; it cannot be combined with a cache flag",
    ),
    (
        lambda c: bool({"fusion", "text_weight"} & c.explicit)
        and not (c.query.images and (c.query.texts or c.query.negative)) and not c.serve.enabled,
        "--fusion and --text-weight say how a picture and texts make one query: give them with --query-image "
        "and --query-text (or --serve, whose page takes a picture and a text)",
    ),
    (
        lambda c: "negative_text" in c.explicit and not c.query.images,
        "--negative-text is taken away from a picture's query: give it with --query-image",
    ),
    (
        lambda c: c.query.fusion == "rrf" and bool({"text_weight", "negative_text"} & c.explicit),
        "--fusion rrf fuses the picture's and each text's ranks: it has no --text-weight and cannot subtract a "
        "--negative-text; use --fusion sum (the default) for those",
    ),
    (
        # however the ONNX file was chosen (--backend onnx, --onnx, or the default file found): it ran
        # at its own precision while --precision said another
        lambda c: "precision" in c.explicit and not c.evaluate.enabled
        and c.embedder.precision not in BACKENDS[_backend_that_embeds(c)].precisions,
        "--precision {precision} applies to the torch backend, and {onnx_chosen}: the file's precision is fixed "
        "when it is exported. Drop --precision, or add --backend torch (and --model) to run the model at it",
    ),
    (
        lambda c: c.embedder.runtime != ONNXRUNTIME and not c.export.enabled and not c.evaluate.models
        and _backend_that_embeds(c) != "onnx",
        "--onnx-runtime {runtime} runs an ONNX file, and this run embeds with the torch backend: give --onnx FILE "
        "(or --backend onnx), or drop --onnx-runtime",
    ),
    (
        lambda c: "onnx" in c.explicit and c.embedder.backend == "torch" and not c.export.enabled
        and not c.evaluate.enabled,
        "--onnx names a file to run, and --backend torch runs --model itself, leaving the file unused: drop one "
        "(--backend onnx or no --backend runs the file)",
    ),
    (
        lambda c: c.embedder.runtime != ONNXRUNTIME and c.embedder.device == "cuda",
        "--onnx-runtime {runtime} runs the file on the CPU: drop --device cuda (onnxruntime-gpu runs it on the GPU)",
    ),
    (
        lambda c: c.embedder.device == "cpu"
        and c.embedder.precision not in {p for b in BACKENDS.values() for p in b.cpu_precisions},
        "--precision {precision} needs --device cuda (on CPU use the int8 ONNX file)",
    ),
)


def selected_mode(cfg: RunConfig) -> Mode:
    """The mode a configuration asks for."""
    return next(m for m in MODES if m.selected(cfg))


def check_config(cfg: RunConfig, spell: Callable[[set[str]], str]) -> str | None:
    """The first reason the configuration is refused, or None.

    spell: turns argparse dests into the flags as the user types them (--frame-stride, --video_dir).
    """
    asked = [m for m in MODES[:-1] if m.selected(cfg)]
    shaping = (("--filter", cfg.filter), ("--group-by", cfg.group_by), ("--dedup", cfg.dedup))
    values = {"unknown": _unknown_backends(cfg), "model": cfg.embedder.model, "precision": cfg.embedder.precision,
              "runtime": cfg.embedder.runtime,
              "search_flags": " and ".join(flag for flag, on in shaping if on), "mode_flag": selected_mode(cfg).flag,
              "search_verb": "change" if sum(bool(on) for _, on in shaping) > 1 else "changes",
              "twice": ", ".join(sorted({m for m in cfg.evaluate.models if cfg.evaluate.models.count(m) > 1})),
              "them": "them" if sum(bool(on) for _, on in shaping) > 1 else "it",
              "quantization": cfg.export.quantization, "dataset": cfg.dataset.name, "onnx": cfg.embedder.onnx,
              # --evaluate takes --filter and --group-by but refuses --dedup (its own check above).
              "searches": ", ".join(("queries", "neighbours") + (() if cfg.dedup else ("--evaluate",))
                                    + ("--serve", "--video_clip", "the Python API"))}
    for when, message in _BEFORE:
        if when(cfg):
            return _said(message, values, cfg)
    if len(asked) > 1:
        return f"{' and '.join(m.flag for m in asked)} are separate modes: run them as separate commands"
    for mode in MODES:
        stray = set(mode.options & cfg.explicit)
        if stray and not mode.selected(cfg):
            return f"{spell(stray)} {'needs' if len(stray) == 1 else 'need'} {mode.flag}" + (
                " NAME" if mode.name == "video" else ""
            )
        for when, message in mode.checks if mode.selected(cfg) else ():
            if when(cfg):
                return _said(message, values, cfg)
    stray = set(_SEGMENT_OPTIONS & cfg.explicit)
    if stray and not cfg.segmented:
        return f"{spell(stray)} {'needs' if len(stray) == 1 else 'need'} --use-segmentation or --use-embedded-segment"
    mode = selected_mode(cfg)
    if cfg.engine not in mode.engines:
        then = ("build its gallery with --engine ray first, then run the same command without it and with "
                f"{'--use-embedded-segment' if cfg.segmented else '--use-embeddings'}" if mode.name == "video"
                else f"build the gallery with --engine ray first, then run {mode.flag} without it"
                if mode.name not in ("evaluate", "export-onnx") else "drop --engine ray")  # they read no gallery
        return (f"--engine {cfg.engine} builds galleries (standard and --use-segmentation runs); other modes run "
                f"locally: {then}")
    for when, message in _AFTER:
        if when(cfg):
            return _said(message, values, cfg)
    # a path typed where there is nothing, after what contradicts (said whatever the files)
    return _missing_path(cfg) or _filter_syntax(cfg.filter)


def _missing_path(c: RunConfig) -> str | None:
    """A typed --dataset, --model or --onnx that names a path where there is nothing, said before any
    dataset or model is opened (a typo in a path is a bad flag, exit 2, not a failure an hour in). A
    name that could be a hub id (owner/name) is left to the hub; --export-onnx writes its --onnx; a
    mode that reads a store and not the dataset (a search, a cache flag) takes a --dataset moved since;
    --evaluate says of its files what each of its backends needs."""
    from .backends import OPEN_CLIP_HUB, open_clip_weights
    from .dataset import is_hub_id

    reads_dataset = not (c.searches_only or c.from_cache)
    if ("dataset" in c.explicit and reads_dataset and not Path(c.dataset.name).exists()
            and not is_hub_id(c.dataset.name)):
        return (f"--dataset {c.dataset.name}: no such file or folder (a local dataset is a folder of pictures, a "
                "parquet file or folder, or a saved dataset; a hub dataset is owner/name)")
    model = c.embedder.model
    if "model" in c.explicit and not model.startswith(OPEN_CLIP_HUB):
        named = open_clip_weights(model)
        if named is not None:
            if named[1] and not Path(named[1]).exists():
                return f"--model {model}: no weights file {named[1]}"
        elif not Path(model).exists() and not is_hub_id(model):
            return (f"--model {model}: no such folder (a local model is the folder its save_pretrained wrote; a "
                    "hub model is owner/name)")
    # --evaluate needs the file named for its onnx-int8 row (its own backend's, where none is named); its fp32
    # twin's row says what it needs itself
    evaluated = not c.evaluate.enabled or "onnx-int8" in c.evaluate.backends or not c.evaluate.backends
    if ("onnx" in c.explicit and not c.export.enabled and evaluated and not c.evaluate.models
            and c.embedder.backend != "torch" and not Path(c.embedder.onnx).exists()):  # --backend torch: refused above
        if c.searches_only or c.from_cache or c.update:  # the store's own file: another export is another file
            return (f"--onnx {c.embedder.onnx}: no such file; pass the file that made the store (or no --onnx: a "
                    "search finds the store's own file where it recorded it, or by its sha256 in ./onnx)")
        model = f" --model {c.embedder.model}" if "model" in c.explicit else ""
        return (f"--onnx {c.embedder.onnx}: no such file (make it with python main.py --export-onnx{model} --onnx "
                f"{c.embedder.onnx})")
    return None


def _said(message: str, values: dict[str, Any], cfg: RunConfig) -> str:
    """A refusal's message with its values; how the ONNX file came to embed only where it says so (it
    reads the store's sidecar)."""
    return message.format(**values, **({"onnx_chosen": _onnx_chosen(cfg)} if "{onnx_chosen}" in message else {}))


def _store_backend(c: RunConfig) -> str | None:
    """The backend of the embedder a run takes from its store: where no --model, --onnx or --backend is
    given, the search modes, --update and a video against the cache embed with the store's own
    (galleries._search_embedder); None for any other run, or a store that cannot be read here."""
    if {"model", "onnx", "backend"} & c.explicit or not (c.searches_only or c.from_cache or c.update):
        return None
    from .store import SIDECAR_FILE

    try:  # the one field, read lightly: this runs for every command line's checks
        backend = json.loads((c.store_dir / SIDECAR_FILE).read_text())["identity"]["backend"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return backend if backend in BACKENDS else None


def _backend_that_embeds(c: RunConfig) -> str:
    return _store_backend(c) or c.embedder.resolve_backend()


def _onnx_chosen(c: RunConfig) -> str:
    """How a run came to embed with an ONNX file, for a refusal of what does not apply to one."""
    if _store_backend(c) == "onnx":
        return "this run embeds with the ONNX file that made its store (no --model, --onnx or --backend given)"
    if "backend" in c.explicit and c.embedder.backend == "onnx":
        return "--backend onnx runs the ONNX file"
    if "onnx" in c.explicit:
        return f"--onnx {c.embedder.onnx} runs that file"
    return f"this run embeds with the ONNX file at the default --onnx, {c.embedder.onnx}, which is there"


def _filter_syntax(text: str | None) -> str | None:
    """A --filter that does not parse is refused with the flags (its columns are checked against
    the catalogue's when the catalogue is read)."""
    if not text:
        return None
    from .filters import FilterError, parse_filter

    try:
        parse_filter(text)
    except FilterError as e:
        return str(e)
    return None


STARTED = time.time()  # when this run began (mark_started; the process's start until then): what it wrote is newer


def mark_started() -> None:
    """A run begins (main.py, before it runs): what the interrupt message takes for this run's own work
    is what was written since (a second run in one process, as the tests make, is not the first's)."""
    global STARTED
    STARTED = time.time()


DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}  # no space, over a quota, over the file-size limit


def disk_full_said(said: str, error: BaseException | None, cfg: RunConfig) -> str:
    """An error's message, and for a run stopped by a full disk (or a quota, or the file-size limit),
    what it kept and how to go on, as after Ctrl-C; the message alone for any other error."""
    if not (isinstance(error, OSError) and error.errno in DISK_FULL):
        return said
    elsewhere = "" if "--output-dir" in said else " (or choose another --output-dir)"
    return f"{said.rstrip('.')}. Free space{elsewhere}; {interrupted_message(cfg).removeprefix('interrupted: ')}"


def interrupted_message(cfg: RunConfig) -> str:
    """What a run stopped by Ctrl-C leaves, and how to go on, for the mode it was in (at a URL, also
    that the next run sends what this one had not sent yet)."""
    said = _interrupted(cfg)
    if cfg.output_url:
        said += (f"; what was not sent to {cfg.output_url} yet (an upload stopped too) is sent by the next run "
                 f"from this working copy ({cfg.output_dir})")
    return said


def _interrupted(cfg: RunConfig) -> str:
    if cfg.export.enabled:
        return "interrupted: nothing was written (the export moves its files into place only at its end)"
    if cfg.searches_only or cfg.evaluate.enabled:
        return "interrupted: this mode builds no store, so there is nothing to resume; run it again"
    from .remedy import to_cache
    from .store import PARTIAL_DIR, SIDECAR_FILE

    sidecar = cfg.store_dir / SIDECAR_FILE
    # a store this run finished (an older one, there while its model loaded, is the one it was replacing)
    built = (sidecar.is_file() and sidecar.stat().st_mtime >= STARTED and not (cfg.store_dir / PARTIAL_DIR).is_dir())
    if cfg.from_cache or (built and not cfg.update):
        # the store was finished before the stop: the same command without the flag would embed it all again
        how = "run it again" if cfg.from_cache else to_cache(cfg.segmented)
        return (f"interrupted: the gallery's store in {cfg.store_dir} is complete; {how} to "
                + ("play the clip against it" if cfg.video.clip is not None else
                   "finish its neighbours, pictures and report without embedding again"))
    kept = "the gallery's complete shards are kept (run the same command again to resume its build)"
    if cfg.video.clip is not None:
        last = (f" (the results of its last complete run in {cfg.video_results_dir} are kept as they were)"
                if (cfg.video_results_dir / "tracks.json").is_file() else "")
        return f"interrupted: the clip starts over when run again{last}; {kept}"
    if cfg.update and built:  # switched in: what is left is the outputs, which the same command makes
        return (f"interrupted: the updated store in {cfg.store_dir} is in place; run the same command again to "
                "finish its neighbours, pictures and report (nothing is embedded again)")
    if cfg.update:
        from .store import NEW_PART_DIR, PART_FILE, UPDATE_DIR

        staged = cfg.store_dir / UPDATE_DIR / NEW_PART_DIR
        if not (staged / PART_FILE).is_file() and not any((staged / PARTIAL_DIR).glob("shard_*.done")):
            return ("interrupted before the update completed a shard of its new photos: the store stays as it was; "
                    "run the same command again to update it")
        return "interrupted: the update's complete shards are kept; run the same command again to finish it"
    before = (" (the store there before stays whole, and searchable, until the build finishes)"
              if sidecar.is_file() else "")
    return f"interrupted: complete shards are kept; run the same command again to resume{before}"

