"""Pictures: captions in a TrueType font sized to the tiles, cut to the tile's width, drawn for any
text (characters the font lacks become '?'); tiles of another size are fitted to the query's."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image, ImageFont

from pipeline import plots
from pipeline.plots import caption_font, caption_size, compose_matches, drawable, fit_text, text_tile


def test_captions_are_drawn_in_dejavu_sans_at_a_size_that_follows_the_tiles():
    font = caption_font(caption_size(128))
    assert isinstance(font, ImageFont.FreeTypeFont) and font.getname()[0] == "DejaVu Sans"
    assert font.size == 12 and caption_size(224) == 15  # larger tiles, larger text
    assert caption_font(12, bold=True).getname() == ("DejaVu Sans", "Bold")


def test_long_captions_keep_their_end_within_the_tile():
    font = caption_font(12)
    assert fit_text("short.jpg", 128) == "short.jpg"
    cut = fit_text("a_very_long_catalogue_file_name_000042.jpg", 128)
    assert cut.startswith("…") and cut.endswith("000042.jpg") and font.getlength(cut) <= 128
    assert font.getlength("…" + "a_very_long_catalogue_file_name_000042.jpg"[-len(cut) :]) > 128  # the most that fits
    assert fit_text("anything", 2) == "…"


def test_characters_the_font_lacks_become_question_marks_and_the_rest_draw():
    """DejaVu Sans draws accents, Greek, Cyrillic and the ellipsis; it has no CJK glyphs, which would
    draw as empty boxes: those become '?'."""
    assert drawable("robe à fleurs, платье, φόρεμα…") == "robe à fleurs, платье, φόρεμα…"
    assert drawable("连衣裙 dress") == "??? dress"


def test_without_dejavu_pillows_own_font_draws_latin_1(monkeypatch):
    """The fallback when matplotlib's font file is missing: Pillow's TrueType font, Latin-1 only."""
    monkeypatch.setattr(plots, "font_file", lambda bold=False: None)
    for cached in (plots.caption_font, plots._glyphs, plots._caption_mask):
        cached.cache_clear()
    try:
        assert isinstance(plots.caption_font(12), ImageFont.FreeTypeFont)
        assert plots.drawable("robe à fleurs 连衣裙…") == "robe à fleurs ????"
        pic = compose_matches(np.full((64, 64, 3), 200, np.uint8), "query 连衣裙", [], [])
        assert (np.asarray(pic).min(axis=2) < 100).any()
    finally:
        monkeypatch.undo()
        for cached in (plots.caption_font, plots._glyphs, plots._caption_mask):
            cached.cache_clear()


def _caption_band(pic: Image.Image, t: int, title: bool) -> np.ndarray:
    size = caption_size(t)
    line_h = round(size * 1.35)
    top = (round(line_h * 1.5) if title else 0) + 2
    return np.asarray(pic)[top + t + 2 :]


def test_a_composite_has_smooth_readable_captions_under_each_tile():
    tile = np.full((128, 128, 3), 200, np.uint8)
    pic = compose_matches(tile, "query\nimg_00042.jpg", [tile] * 3, [f"d=0.{i}00\nimg_0000{i}.jpg" for i in range(3)])
    band = _caption_band(pic, 128, title=False)
    grey = band.min(axis=2)
    assert len(np.unique(grey)) > 20  # anti-aliased TrueType, not a 1-bit bitmap font
    rows = np.flatnonzero((grey < 128).any(axis=1))
    assert rows.max() - rows.min() >= 20  # two lines of text about 9 px high each, not 7 px bitmap glyphs
    first = band[:, 6 : 6 + 128]
    assert ((first[..., 2] > 150) & (first[..., 0] < 80)).any()  # the query's caption in the accent's blue
    assert pic.size == (4 * (128 + 6) + 6 + 12, 2 + 128 + 4 + 2 * 16 + 6)


def test_a_title_is_not_cut_to_a_short_rows_width_and_a_row_of_equals_sets_none_apart():
    """A track seen once read "…rson over time" (its number cut off); a person's crops over time
    are equals: no query colour and no rule after the first."""
    tile = np.full((64, 64, 3), 200, np.uint8)
    title = "Track 12: the person over time"
    pic = compose_matches(tile, "0.0 s", [], [], title=title)
    size = caption_size(64)
    assert fit_text(title, pic.width - 2 * 6, size + 1, bold=True) == title
    from pipeline.plots import MAX_TITLE_PX

    assert compose_matches(tile, "q", [tile] * 5, ["d"] * 5, title="a long description " * 100).width == MAX_TITLE_PX
    row = compose_matches(tile, "0.0 s", [tile], ["1.0 s"], title="t", first_is_query=False)
    assert row.width == 2 * (64 + 6) + 6  # no gap for a rule
    band = np.asarray(row)[:, 6:6 + 64]
    assert not ((band[..., 2] > 150) & (band[..., 0] < 80)).any()  # no query-coloured caption


def test_titles_long_captions_and_tiles_of_another_size():
    t = 224
    query = text_tile("a red floral midi dress with long sleeves and a belt 连衣裙", t)
    match = np.zeros((128, 128, 3), np.uint8)  # a stored thumbnail beside a 224 px query tile
    pic = compose_matches(query, "text", [match], ["d=0.1\n" + "x" * 60], title="text query: 连衣裙…")
    arr = np.asarray(pic)
    assert pic.size[0] == 2 * (t + 6) + 6 + 12
    title_band = arr[: round(caption_size(t) * 1.35 * 1.5)]
    assert (title_band.min(axis=2) < 80).any()  # the title is drawn
    top = round(caption_size(t) * 1.35 * 1.5) + 2
    x = 6 + t + 6 + 12
    assert (arr[top + 10 : top + t - 10, x + 10 : x + t - 10] == 0).all()  # the 128 px tile fills 224 px


def test_text_tiles_wrap_the_query_inside_a_frame():
    tile = text_tile("a red floral midi dress with long sleeves and a belt", size=128)
    assert tile.shape == (128, 128, 3) and tile.dtype == np.uint8
    assert all((edge == (170, 176, 186)).all() for edge in (tile[0], tile[127], tile[:, 0], tile[:, 127]))
    dark = (tile[1:127, 1:127].min(axis=2) < 100).any(axis=1)
    lines = np.flatnonzero(np.diff(dark.astype(int)) == 1)
    assert len(lines) >= 3  # wrapped onto several lines
    inner = tile[1:127, 1:127].min(axis=2)
    assert (inner[:, :6] == 255).all() and (inner[:, -6:] == 255).all()  # nothing drawn over the margins


@pytest.mark.parametrize("text", ["", "   ", "x" * 200])
def test_text_tiles_take_any_text(text):
    assert text_tile(text, 64).shape == (64, 64, 3)


def test_a_plot_is_drawn_again_only_when_what_it_shows_changed(tmp_path):
    from pipeline.runner import PLOTS_FILE, plot_once

    path, drawn = tmp_path / "heat.png", []

    def draw(text: bytes = b"png") -> None:
        drawn.append(text)
        path.write_bytes(text)

    assert plot_once(path, ["heatmap", np.arange(4.0)], draw) and drawn == [b"png"]
    assert not plot_once(path, ["heatmap", np.arange(4.0)], draw) and drawn == [b"png"]  # the same inputs: kept
    assert plot_once(path, ["heatmap", np.arange(4.0, dtype=np.float32)], draw) and len(drawn) == 2  # other type
    assert plot_once(path, ["heatmap, 100 cells", np.arange(4.0)], draw) and len(drawn) == 3  # drawn otherwise
    drawn[1:] = []
    assert not plot_once(path, ["heatmap, 100 cells", np.arange(4.0)], draw)
    assert plot_once(path, ["heatmap", np.arange(5.0)], draw) and len(drawn) == 2  # other inputs: drawn again
    path.unlink()
    assert plot_once(path, ["heatmap", np.arange(5.0)], draw) and len(drawn) == 3  # the file gone: drawn again

    def fails() -> None:
        raise OSError("disk full")

    with pytest.raises(OSError):
        plot_once(path, ["heatmap", np.zeros(3)], fails)
    assert path.name not in json.loads((tmp_path / PLOTS_FILE).read_text())  # forgotten before drawing
    assert plot_once(path, ["heatmap", np.arange(5.0)], draw) and len(drawn) == 4  # a failed run's file not trusted
    other = tmp_path / "hist.png"
    assert plot_once(other, ["histogram", np.ones((2, 0))], lambda: other.write_bytes(b"h"))
    assert set(json.loads((tmp_path / PLOTS_FILE).read_text())) == {"heat.png", "hist.png"}


@pytest.mark.parametrize("top", [2e-4, 3e-6, 0.7, 1.9])
def test_the_histograms_axis_numbers_never_run_into_each_other(top, monkeypatch, tmp_path):
    """A catalogue of near copies has distances of ~1e-4: its axis numbers must stay apart (written out
    with seven digits they overlapped into one unreadable line)."""
    from pipeline import plots

    figures = []
    monkeypatch.setattr(plots, "save_figure", lambda fig, path: figures.append(fig))
    values = np.concatenate([np.random.default_rng(0).uniform(0, top / 8, 400), [top]])
    plots.save_histogram(values, tmp_path / "h.png", "Distance to the nearest other item")
    fig = figures[0]
    fig.canvas.draw()
    boxes = [t.get_window_extent() for t in fig.axes[0].get_xticklabels() if t.get_text() and t.get_visible()]
    assert len(boxes) >= 3
    said = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert all(a.x1 + 4 <= b.x0 for a, b in zip(boxes, boxes[1:])), said
