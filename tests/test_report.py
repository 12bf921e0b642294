"""The run summary: stages keyed by name, printed by label, each part under the stage it belongs to."""

from __future__ import annotations

import os
import re

from pipeline.report import RunSummary


def test_stages_are_keyed_by_name_and_parts_follow_their_stage():
    s = RunSummary(mode="standard")
    s.timed("load model", 1.0)
    s.timed("embed", 10.0, "embed stage (wall)")
    s.timed("embed/items", 4.0, "decode+segment+crop (worker)")
    s.timed("embed/infer", 5.0, "inference (main thread)")
    s.timed("finalize store", 0.5)
    s.timed("embed/items/segment", 3.0, "of which segmentation predict")  # known only after the build
    s.timed("embed/infer", 1.0)
    assert s.stages["embed/infer"] == 6.0 and s.stages["embed"] == 10.0
    assert [name for name, *_ in s.stage_rows()] == [
        "load model", "embed", "embed/items", "embed/items/segment", "embed/infer", "finalize store"
    ]
    line = next(x for x in s.format().splitlines() if x.startswith("stages:"))
    assert line == (
        "stages:   load model 1.0 s, embed stage (wall) 10.0 s,   decode+segment+crop (worker) 4.0 s,     of which "
        "segmentation predict 3.0 s,   inference (main thread) 6.0 s, finalize store 0.5 s"
    )


def test_a_results_table_is_printed_once_and_never_repeated_as_notes():
    """--evaluate's markdown table is for the terminal; the HTML report draws the results as a real
    table, so the table is not among the notes the report lists."""
    from pipeline.search import format_table
    from pipeline.webreport import summary_payload

    s = RunSummary(mode="evaluate")
    s.notes.append("2 queries skipped: their product has no other image")
    m = {"queries": 6, "recall@1": 0.5, "recall@5": 1.0, "recall@10": 1.0, "mrr": 0.75}
    s.tables.append(format_table({"same-product": {"onnx-int8": m}}))
    printed = s.format().splitlines()
    at = printed.index("results:")
    assert printed[at + 1 :] == [
        "  | task | model / backend | queries | R@1 | R@5 | R@10 | MRR | img/s |",
        "  |---|---|---|---|---|---|---|---|",
        "  | same-product | onnx-int8 | 6 | 0.500 | 1.000 | 1.000 | 0.750 | — |",  # no speed measured: a dash
    ]
    assert summary_payload(s)["notes"] == ["2 queries skipped: their product has no other image"]


def test_a_long_stage_says_it_is_at_work_and_only_the_innermost_one_says(monkeypatch, caplog):
    """At 100k items the index, neighbours and report ran 110 s with nothing on the screen: a stage
    that runs long says so (not under a progress bar, which says as much; of nested ones, the inner)."""
    import time

    from tqdm import tqdm

    from pipeline import report

    monkeypatch.setattr(report, "STAGE_SAID_AFTER_S", 0.15)
    monkeypatch.setattr(report, "STAGE_SAID_EVERY_S", 0.2)
    summary = report.RunSummary(mode="standard")
    with caplog.at_level("INFO", logger="pipeline.report"):
        with summary.stage("index"):
            with summary.stage("index/train", "train the lists"):
                time.sleep(0.6)  # said at 0.15 s (then held at 0.35 and 0.55: the inner stage says)
            time.sleep(0.6)  # the outer said at 0.75 s or 0.95, the inner stage over
        with open(os.devnull, "w") as sink, summary.stage("embed"), tqdm(total=1, disable=False, file=sink):
            time.sleep(0.5)  # under a bar: nothing said
        with summary.stage("quick"):
            pass
        time.sleep(0.3)
    said = [r.getMessage() for r in caplog.records]
    assert said and all(re.fullmatch(r"standard: (train the lists|index) at work, \d+ s so far", s) for s in said), said
    assert said[0].startswith("standard: train the lists at work")
    assert any(s.startswith("standard: index at work") for s in said)  # once the inner stage was done
    assert set(summary.stages) == {"index", "index/train", "embed", "quick"}


def test_a_failed_items_name_holding_a_line_break_stays_on_its_own_line():
    """A file named "x.jpg\\n  - y.jpg: ok" printed a failure line that read as two items."""
    summary = RunSummary(mode="standard")
    summary.fail("x.jpg\n  - y.jpg: ok\r", "not a recognized image format")
    assert summary.failure_lines() == ["failures: 1 item(s):",
                                       "  - x.jpg\\n  - y.jpg: ok\\r: not a recognized image format"]
