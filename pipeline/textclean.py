"""open_clip's text cleaning, without torch: what its HFTokenizer does to a text before the
Hugging Face tokenizer sees it (open_clip/tokenizer.py: basic_clean, then whitespace, lower-case,
or canonicalize). An exported open_clip text tower records the mode in its metadata and the ONNX
backend cleans texts here, so that its token ids equal open_clip's.

Marqo-FashionSigLIP uses "canonicalize" (lower-case, punctuation removed, as big_vision does).
"""

from __future__ import annotations

import html
import string

MODES = ("whitespace", "lower", "canonicalize")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def _basic(text: str) -> str:
    try:
        import ftfy
    except ImportError:  # pragma: no cover - ftfy is in requirements.txt; only broken Unicode differs
        fixed = text
    else:
        fixed = ftfy.fix_text(text)
    return html.unescape(html.unescape(fixed)).strip()


def _whitespace(text: str) -> str:
    return " ".join(text.split()).strip()


def clean(text: str, mode: str) -> str:
    """The text as open_clip's clean function `mode` leaves it ("" or None: unchanged)."""
    if not mode:
        return text
    if mode == "whitespace":
        return _whitespace(_basic(text))
    if mode == "lower":
        return _whitespace(_basic(text)).lower()
    if mode == "canonicalize":
        return " ".join(_basic(text).replace("_", " ").translate(_PUNCTUATION).lower().split()).strip()
    raise ValueError(f"unknown text cleaning {mode!r} (one of {', '.join(MODES)})")
