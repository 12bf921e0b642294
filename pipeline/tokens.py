"""The text side's tokenizer: found, loaded, and refused when it cannot tell texts apart.

A model folder saved with `save_pretrained` alone has no tokenizer files, and transformers 5 still
loads one for it: an empty CLIPTokenizer (two tokens, no merges) that maps every word to its unknown
token. Text search with it answers every text alike, and an export verified against torch on it
looks perfect, since both sides share the same empty tokenizer. So every tokenizer, the model's
(torch backend, export) and an exported tokenizer.json (ONNX backend), is tried on a few probe
texts before anything uses it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import PipelineError, first_line

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

TEXT_CONTEXT = 77  # CLIP's text context length; the text ONNX takes exactly this many tokens

# What a model folder holds when it has a tokenizer (any one of them: CLIP's BPE, SentencePiece, WordPiece).
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer_config.json", "spiece.model", "vocab.txt")

# Different texts of the same length: a tokenizer that gives two of them the same ids cannot search by text.
DISTINCT_TEXTS = ("red dress", "tan shoes", "blue denim jacket", "black ankle boots")
MOST_UNKNOWN = 0.5  # more than this share of the probe texts' tokens unknown: not the model's tokenizer


class TokenizerError(PipelineError):
    """No tokenizer, or one that cannot tell texts apart."""


def check_distinct(encode: Callable[[list[str]], Sequence[Sequence[int]]], unk_id: int | None, where: str) -> None:
    """Refuse a tokenizer that maps different probe texts to the same ids, or most of their words
    to its unknown token.

    Args:
        encode: texts -> their token ids, as the search will make them (padded or not).
        unk_id: the unknown token's id, when the tokenizer has one.
        where: names the tokenizer in the message.
    Raises:
        TokenizerError: saying which texts collided, or what share was unknown.
    """
    ids = [list(seq) for seq in encode(list(DISTINCT_TEXTS))]
    seen: dict[tuple[int, ...], str] = {}
    for text, seq in zip(DISTINCT_TEXTS, ids):
        if (key := tuple(seq)) in seen:
            raise TokenizerError(
                f"{where} maps different texts to the same ids ({seen[key]!r} and {text!r}), so every text "
                "would find the same items; it is not the model's tokenizer"
            )
        seen[key] = text
    flat = [i for seq in ids for i in seq]
    if unk_id is not None and flat and flat.count(unk_id) / len(flat) > MOST_UNKNOWN:
        raise TokenizerError(
            f"{where} maps {flat.count(unk_id)} of {len(flat)} tokens of plain English texts to its unknown "
            "token; it is not the model's tokenizer"
        )


def load_tokenizer(model: str) -> PreTrainedTokenizerBase:
    """The model's tokenizer (a hub id or a local folder), checked to tell texts apart.

    Raises:
        TokenizerError: the folder has no tokenizer files, none loads, or the one that loads is
            degenerate (check_distinct). The message says how to give the folder its tokenizer.
    """
    from transformers import AutoTokenizer

    remedy = (
        "copy the tokenizer files into the folder "
        "(AutoTokenizer.from_pretrained(HUB_ID).save_pretrained(DIR) beside the model's save_pretrained)"
    )
    local = Path(model)
    if local.is_dir() and not any((local / name).is_file() for name in TOKENIZER_FILES):
        raise TokenizerError(f"{model} has no tokenizer files ({', '.join(TOKENIZER_FILES)}): {remedy}")
    try:
        tok = AutoTokenizer.from_pretrained(model)
    except ImportError as e:  # a slow tokenizer's library (SigLIP's sentencepiece) not installed
        raise TokenizerError(f"the tokenizer of {model} cannot load: {first_line(e)} (pip install -r "
                             "requirements.txt installs it)") from e
    except (OSError, ValueError, TypeError) as e:
        raise TokenizerError(f"{model} has no usable tokenizer ({first_line(e)})") from e
    where = f"the tokenizer of {model}"
    try:
        check_distinct(
            lambda texts: tok(texts, padding="max_length", truncation=True, max_length=TEXT_CONTEXT)["input_ids"],
            None,
            where,
        )
        check_distinct(lambda texts: tok(texts)["input_ids"], tok.unk_token_id, where)
    except TokenizerError as e:
        raise TokenizerError(f"{e}: {remedy}") from None
    return tok
