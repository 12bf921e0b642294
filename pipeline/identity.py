"""What made a store's vectors and what its gallery was made from: two frozen types, written to the
sidecar and compared in one place, and the store format they belong to.

A field left None is not known or not asked for: a request (the flags the user typed) names only
what it cares about, and `differences` compares just those fields. A store written by another
format version is refused with what to do, never patched.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, TypeVar

from .backends import ONNXRUNTIME, hub_reference

# 2: identities typed, "pixels" always recorded (format 1 stores made before the device path lacked it).
STORE_FORMAT = 2

T = TypeVar("T", bound="_Comparable")


class _Comparable:
    """JSON form (None fields left out) and field-by-field comparison, shared by both identities."""

    # Fields recorded only since a later version, for some stores: one that lacks them is not compared on them
    RECORDED_LATER: frozenset[str] = frozenset()
    # Fields only some kinds of store have (read back filled in where they have them): compared only there
    OF_SOME_KINDS: frozenset[str] = frozenset()
    # A name field -> the field recording its content's sha256: where both sides record the same
    # content, the names are not compared
    NAMED_BY_CONTENT: dict[str, str] = {}

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}  # type: ignore[call-overload]  # subclasses are dataclasses

    def compared_json(self) -> dict[str, Any]:
        """What `differences` compares (VectorIdentity's holds the default runtime its to_json leaves out)."""
        return self.to_json()

    @classmethod
    def from_json(cls: type[T], data: dict[str, Any], where: str) -> T:
        """Read a sidecar's or run file's dict; a key this version does not know is refused."""
        known = {f.name for f in fields(cls)}  # type: ignore[arg-type]  # subclasses are dataclasses
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{where}: unknown {cls.__name__} field(s) {unknown}")
        return cls(**data)

    def asks(self: T, **values: Any) -> T:
        """A copy with more fields known (dataclasses.replace for the subclasses)."""
        return type(self)(**{**asdict(self), **values})  # type: ignore[call-overload]  # subclasses are dataclasses


def differences(asked: _Comparable, found: _Comparable, only: frozenset[str] | None = None) -> list[str]:
    """'field: cache has X, asked for Y' for every field that `asked` records (and `only` names, when
    given) and that differs in `found` (dicts such as the preprocessing compared key by key). A
    field this version records that `found` lacks (RECORDED_LATER: a store made before) is not
    compared, as it was not then."""
    want, have = asked.compared_json(), found.compared_json()
    if only is not None:
        want = {k: v for k, v in want.items() if k in only}
    want = {k: v for k, v in want.items()
            if k in have or k not in type(found).RECORDED_LATER | type(found).OF_SOME_KINDS}
    for name, content in type(found).NAMED_BY_CONTENT.items():
        if want.get(content) and want.get(content) == have.get(content):
            want.pop(name, None)  # the same bytes under another name: a folder moved or copied
    return describe_differences(want, have)


def describe_differences(expected: dict[str, Any], found: dict[str, Any], prefix: str = "") -> list[str]:
    """The same for plain dicts (keys of `expected` only; nested dicts recursed)."""
    out = []
    for key in sorted(expected):
        a, b = found.get(key, ABSENT), expected.get(key, ABSENT)
        if isinstance(a, dict) and isinstance(b, dict):
            out += describe_differences(b, a, prefix=f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: cache has {said_value(key, a)}, asked for {said_value(key, b)}")
    return out


ABSENT = "<absent>"  # a key one side does not record
# what a key not recorded means, where it means one
_ABSENT_IS = {"config": "the default configuration", "runtime": "'onnxruntime'"}
# what a recorded None means, where it means something a person typed otherwise
_NONE_IS = {"limit": "every row (--limit 0)", "max_persons": "every person (made before --max-persons)"}


def said_value(key: str, value: Any) -> str:
    """A recorded value as a difference names it: repr, or what its absence means (a dataset
    recorded without a configuration is its default one)."""
    name = key.rsplit(".", 1)[-1]
    if value is None and name in _NONE_IS:
        return _NONE_IS[name]
    return _ABSENT_IS.get(name, repr(value)) if value == ABSENT else repr(value)


@dataclass(frozen=True)
class VectorIdentity(_Comparable):
    """What made the vectors: change any field and vectors are no longer comparable.

    backend: "torch" | "onnx". family: "clip", "siglip" (backends.FAMILIES; a store made before
    families were recorded is CLIP's). model: the hub id or the absolute path of the model folder (the ONNX
    file's source model). model_sha256: a local folder's weights. onnx_sha256: the ONNX file's bytes.
    precision: "fp32", "fp16", "int8", "onnx-int8-static", ... preprocess: the model's preprocessing
    (size, crop, mean, std, ...). dim: the vector length. pixels: which code made the model input
    (preprocess.PIXELS_OF_DECODE: "pil" on the CPU, Pillow's decode and resize; "pil+torch" with
    --decode cpu-simd, Pillow's decode and torch's resize; "torchvision" on the device). runtime:
    what ran an ONNX file ("onnxruntime", "openvino": vectors within rounding of each other, not equal;
    a store made before it was recorded was made by onnxruntime, the one runtime then).
    """

    # Sharded weights, open_clip's .pth and weights under other names are hashed since 2026-12-05
    RECORDED_LATER = frozenset({"model_sha256"})
    # an ONNX store's, always (from_json fills in onnxruntime where it is not written); a torch store has none
    OF_SOME_KINDS = frozenset({"runtime"})
    # a local model folder is known by its weights: the same weights in a folder moved or copied are the same model
    NAMED_BY_CONTENT = {"model": "model_sha256"}

    backend: str | None = None
    family: str | None = None
    model: str | None = None
    model_sha256: str | None = None
    onnx_sha256: str | None = None
    precision: str | None = None
    preprocess: dict[str, Any] | None = None
    dim: int | None = None
    pixels: str | None = None
    runtime: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The fields known, but onnxruntime, the one runtime before OpenVINO: a store it makes is
        written as before (compared_json holds it)."""
        data = super().to_json()
        if data.get("runtime") == ONNXRUNTIME:
            del data["runtime"]
        return data

    def compared_json(self) -> dict[str, Any]:
        return super().to_json()

    def label(self) -> str:
        """What made the vectors, for a person: the model and how it ran ("/models/clip (onnx, onnx-int8-static)")."""
        runtime = self.runtime if self.runtime not in (None, ONNXRUNTIME) else None
        how = ", ".join(str(v) for v in (self.backend, self.precision, runtime) if v)
        return f"{self.model or 'an unnamed model'}" + (f" ({how})" if how else "")

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str) -> VectorIdentity:
        if data.get("backend") and "family" not in data:  # made before families were recorded: CLIP's
            data = {**data, "family": "clip"}
        if data.get("backend") == "onnx" and "runtime" not in data:  # made before runtimes were recorded
            data = {**data, "runtime": ONNXRUNTIME}
        if isinstance(data.get("model"), str):  # an open_clip hub model recorded by its plain id before: one name
            data = {**data, "model": hub_reference(data["model"], data.get("family"))}
        return super().from_json(data, where)


@dataclass(frozen=True)
class GallerySource(_Comparable):
    """What the gallery was made from: the dataset rows and, for person crops, the segmenter.

    kind: "standard" (one item per row) | "segment" (one per person crop). dataset: the hub id or
    the absolute path. limit: None for every row. seg_*, keep_unsegmented, max_persons: the
    segmentation run's settings (max_persons: the crops kept per photo; None in a store made
    before the cap, which kept every person found; seg_weights: the sha256 of the segmenter's
    weights file, where it is a local file: weights retrained and saved over the same name cut
    other crops).
    """

    # since 2026-12-05 and 2026-12-07; not `config`: a store without one is of the default configuration
    RECORDED_LATER = frozenset({"id_column", "seg_weights"})

    kind: str | None = None
    dataset: str | None = None
    split: str | None = None
    limit: int | None = None
    image_column: str | None = None
    id_column: str | None = None  # --id-column: what --update knows the photos by (None: their bytes' sha256)
    config: str | None = None  # --config: the hub dataset's configuration (None: its default)
    seg_model: str | None = None
    seg_backend: str | None = None
    seg_conf: float | None = None
    seg_imgsz: int | None = None
    keep_unsegmented: bool | None = None
    max_persons: int | None = None
    seg_weights: str | None = None

    def to_json(self) -> dict[str, Any]:
        """Every field of its kind, None included (limit None means every row), but the id column
        only when there is one; the segmenter's settings only for a segmented gallery."""
        data = asdict(self)
        for key in ("id_column", "seg_weights", "config"):  # left out when unknown: stores made before, unchanged
            if data[key] is None:
                del data[key]
        if self.kind != "segment":
            data = {k: v for k, v in data.items() if not k.startswith("seg_") and k not in _SEGMENT_ONLY}
        return data


_SEGMENT_ONLY = frozenset({"keep_unsegmented", "max_persons"})
