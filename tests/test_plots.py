"""Pictures: captions the bitmap font cannot draw as given are drawn, not fatal."""

from __future__ import annotations

import numpy as np

from pipeline.plots import compose_matches, drawable, fit_text


def test_long_and_non_latin_captions_are_drawn():
    """A caption longer than the tile keeps its end after '...', and characters outside Latin-1 (which
    the bitmap font lacks: an ellipsis, a CJK query) become '?' instead of a UnicodeEncodeError."""
    assert fit_text("person #123 (track 45)", 10) == "...ack 45)"
    assert fit_text("short", 10) == "short"
    assert drawable("robe à fleurs 连衣裙…") == "robe à fleurs ????"
    tile = np.full((64, 64, 3), 200, np.uint8)
    pic = compose_matches(tile, "query 连衣裙 " * 5, [tile], ["d=0.1\n" + "x" * 40], title="text query: 连衣裙…")
    arr = np.asarray(pic)
    assert pic.size[0] > 2 * 64
    head, pad = 30, 6  # the title line's height; the margin
    caption, title = arr[head + 64 + 2 : head + 64 + 12, pad : pad + 64], arr[5:20, :200]
    assert (caption[..., 0] > 150).any() and (caption[..., 1] < 80).any()  # red query caption drawn
    assert (title.min(axis=2) < 80).any()  # black title text drawn
