"""pipeline/filters.py: every operator against a brute-force reference on a generated shop table,
SQL's missing-value rule, and errors that name the column and point at the place."""

from __future__ import annotations

import operator

import numpy as np
import pyarrow as pa
import pytest

from pipeline.errors import UsageError
from pipeline.filters import Filter, FilterError, parse_filter

CATEGORIES = ["dress", "top", "skirt", "coat", "shoes"]
COLOURS = ["red", "blue", "black", "white", None]


@pytest.fixture(scope="module")
def shop() -> pa.Table:
    rng = np.random.default_rng(5)
    n = 400
    price = rng.uniform(5, 200, n).round(2).tolist()
    price[7] = None
    return pa.table({
        "source_row": np.arange(n),
        "category": [CATEGORIES[i] for i in rng.integers(0, 5, n)],
        "colour": [COLOURS[i] for i in rng.integers(0, 5, n)],
        "price": pa.array(price, pa.float64()),
        "stock": rng.integers(0, 20, n),
        "in_sale": rng.integers(0, 2, n).astype(bool),
        "name": [f"it's item {i}" for i in range(n)],
    })


def rows(table: pa.Table) -> list[dict]:
    return table.to_pylist()


OPS = {"=": operator.eq, "!=": operator.ne, "<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge}


def reference(table: pa.Table, test) -> np.ndarray:
    return np.array([r[test[0]] is not None and test[1](r) for r in rows(table)])


CASES = [
    ("category = 'dress'", lambda r: r["category"] == "dress"),
    ("category != 'dress'", lambda r: r["category"] != "dress"),
    ("category <> 'dress'", lambda r: r["category"] != "dress"),
    ("price < 50", lambda r: r["price"] is not None and r["price"] < 50),
    ("price <= 50.5", lambda r: r["price"] is not None and r["price"] <= 50.5),
    ("price > 120", lambda r: r["price"] is not None and r["price"] > 120),
    ("price >= 1.2e2", lambda r: r["price"] is not None and r["price"] >= 120),
    ("stock = 3", lambda r: r["stock"] == 3),
    ("stock < 2.5", lambda r: r["stock"] < 2.5),
    ("in_sale = true", lambda r: r["in_sale"]),
    ("in_sale = FALSE", lambda r: not r["in_sale"]),
    ("colour IN ('red', 'blue')", lambda r: r["colour"] in ("red", "blue")),
    ("colour NOT IN ('red', 'blue')", lambda r: r["colour"] is not None and r["colour"] not in ("red", "blue")),
    ("colour IS NULL", lambda r: r["colour"] is None),
    ("colour is not null", lambda r: r["colour"] is not None),
    ("NOT colour = 'red'", lambda r: r["colour"] is not None and r["colour"] != "red"),
    ("category = 'dress' AND price < 50", lambda r: r["category"] == "dress" and r["price"] is not None
     and r["price"] < 50),
    ("category = 'dress' OR category = 'top' AND stock > 10",
     lambda r: r["category"] == "dress" or (r["category"] == "top" and r["stock"] > 10)),
    ("(category = 'dress' OR category = 'top') AND stock > 10",
     lambda r: r["category"] in ("dress", "top") and r["stock"] > 10),
    ("NOT (category = 'dress' OR price > 100) AND \"stock\" >= 1",
     lambda r: r["category"] != "dress" and r["price"] is not None and r["price"] <= 100 and r["stock"] >= 1),
    ("name = 'it''s item 12'", lambda r: r["name"] == "it's item 12"),
    ("`colour` = 'white' or stock IN (0, 19)", lambda r: r["colour"] == "white" or r["stock"] in (0, 19)),
]


@pytest.mark.parametrize("text, truth", CASES, ids=[c[0] for c in CASES])
def test_each_operator_matches_a_brute_force_reference(shop, text, truth):
    got = Filter.parse(text, shop.schema).mask(shop)
    want = np.array([bool(truth(r)) for r in rows(shop)])
    assert got.dtype == bool and got.shape == (shop.num_rows,)
    assert np.array_equal(got, want)
    assert 0 < got.sum() < shop.num_rows or text in ("colour IS NULL",)


def test_a_missing_value_never_matches_even_negated(shop):
    row7 = Filter.parse("price < 1000", shop.schema).mask(shop)[7]
    assert not row7 and not Filter.parse("NOT price < 1000", shop.schema).mask(shop)[7]


@pytest.mark.parametrize(
    "text, message, at",
    [
        ("category = ", "expected a value, found the end of the filter", 10),
        ("category = dress", "expected a value, found 'dress' (texts are quoted: 'dress')", 11),
        ('category = "dress"', "expected a value, found 'dress' (double quotes name a column, as in SQL; a text is "
                               "in single quotes: 'dress')", 11),
        ("name = Product_5", "expected a value, found 'Product_5' (texts are quoted: 'Product_5')", 7),  # its own
        ("category == 'dress'", "expected a value, found '='", 10),
        ("(category = 'dress'", "expected ')', found the end of the filter", 19),
        ("category = 'dress' price < 3", "expected AND, OR or the end, found 'price'", 19),
        ("category = 'dress", "a quoted text is not closed", 11),
        ("category ~ 'x'", "unexpected character '~'", 9),
        ("", "the filter is empty", 0),
        ("colour IN ('red' 'blue')", "expected ')' or ',' in the IN list", 17),
        ("AND price < 3", "expected a column name, found 'and'", 0),
    ],
)
def test_syntax_errors_point_at_the_place(shop, text, message, at):
    with pytest.raises(FilterError) as e:
        Filter.parse(text, shop.schema)
    said = str(e.value)
    assert message in said and f"(at character {at + 1})" in said
    assert said.splitlines()[-1] == "  " + " " * at + "^"
    assert isinstance(e.value, UsageError)  # exit 2, like a bad flag


@pytest.mark.parametrize(
    "text, message",
    [
        ("colour_name = 'red'", "unknown column 'colour_name'; the catalogue's columns are: category, colour, price"),
        ("prise < 50", "unknown column 'prise'; did you mean 'price'? the catalogue's columns are: category, colour, "
                       "price"),
        ("Colour = 'red'", "unknown column 'Colour'; did you mean 'colour'?"),
        ("price < '50'", "type mismatch: 'price' is a number column, compared with text '50' (leave a number bare: "
                         "price < 50)"),
        ("price >= 'cheap'", "compared with text 'cheap' (a number column is compared with numbers, written bare: "
                             "price >= 50)"),
        ("category = 3", "type mismatch: 'category' is a text column, compared with number 3 (quote a text: "
                         "category = '3')"),
        ("category IN ('dress', 2.5)", "compared with number 2.5 (quote texts: category IN ('2.5', …))"),
        ("category NOT IN (1)", "compared with number 1 (quote texts: category NOT IN ('1', …))"),
        ("in_sale > true", "'in_sale' is true/false: compare it with = or !="),
    ],
)
def test_columns_and_types_are_checked(shop, text, message):
    with pytest.raises(FilterError, match=None) as e:
        Filter.parse(text, shop.schema)
    assert message in str(e.value)


def test_a_store_with_metadata_of_no_columns_says_how_columns_are_kept():
    """A gallery of a dataset with no other column than its pictures: "the catalogue's columns are: none"
    left the user to guess why; it says where columns come from."""
    with pytest.raises(FilterError) as e:
        Filter.parse("price < 1", pa.schema([("source_row", pa.int64())]))
    assert ("unknown column 'price'; the catalogue's columns are: none (the store keeps no metadata: a dataset's "
            "other columns, or an image folder's metadata.csv, are kept when the gallery is built)") in str(e.value)


def test_the_text_is_parsed_never_run():
    node = parse_filter("name = '__import__(\"os\").system(\"false\")'")
    assert node.values == ('__import__("os").system("false")',)


def test_decimals_on_an_integer_column_and_values_a_column_cannot_take():
    table = pa.table({"stock": pa.array([49, 50, 10], pa.int64()),
                      "day": pa.array([0, 1, 2], pa.int32()).cast(pa.date32())})
    assert Filter.parse("stock IN (49.5, 10)", table.schema).mask(table).tolist() == [False, False, True]
    assert Filter.parse("day >= '1970-01-02'", table.schema).mask(table).tolist() == [False, True, True]
    # a text a date column cannot read: said where it is, with the form it takes (not Arrow's parse error)
    with pytest.raises(FilterError, match=r"'yesterday' is not a date, 'YYYY-MM-DD', as column 'day' \(date32\[day\]\) "
                                          r"holds \(at character 1\)"):
        Filter.parse("day = 'yesterday'", table.schema)
    with pytest.raises(FilterError, match=r"'2026-13-01' is not a date"):
        Filter.parse("day > '2026-13-01'", table.schema)
    stamps = pa.schema([("added", pa.timestamp("us")), ("at", pa.time64("us"))])
    with pytest.raises(FilterError, match=r"'soon' is not a date or date-time, 'YYYY-MM-DD' or 'YYYY-MM-DD HH:MM"):
        Filter.parse("added < 'soon'", stamps)
    with pytest.raises(FilterError, match=r"'noon' is not a time of day"):
        Filter.parse("at < 'noon'", stamps)
    Filter.parse("added > '2026-01-05 12:00' AND added < '2026-02-01' AND at < '10:30'", stamps)  # forms it reads
    zoned = pa.schema([("at", pa.timestamp("us", tz="Europe/Berlin"))])  # an hour a clock change skips or repeats
    with pytest.raises(FilterError, match=r"'2026-03-29 02:30' does not exist in the time zone of column 'at', "
                                          r"Europe/Berlin \(a clock change\): give it with its offset"):
        Filter.parse("at > '2026-03-29 02:30'", zoned)
    with pytest.raises(FilterError, match=r"'2026-10-25 02:30' is there twice"):
        Filter.parse("at > '2026-10-25 02:30'", zoned)
    Filter.parse("at > '2026-10-25 02:30+01:00'", zoned)
    with pytest.raises(FilterError, match=r"expected a value, found 'null' \(a missing value is tested with IS NULL"):
        Filter.parse("stock = NULL", table.schema)
    with pytest.raises(FilterError, match="nested too deeply|characters; at most"):
        Filter.parse("(" * 5000 + "stock = 1" + ")" * 5000, table.schema)


def test_a_client_filter_narrows_the_servers_never_widens():
    from pipeline.metadata import json_value as _json_value
    from pipeline.serve import both_filters

    assert both_filters("category = 'dress'", "price < 5") == "(category = 'dress') AND (price < 5)"
    assert both_filters("category = 'dress'", "") == "category = 'dress'" and both_filters(None, None) is None
    assert both_filters(None, "price < 5") == "price < 5"  # alone, as typed: a refusal points into it
    # A client's text that would close the parentheses and OR its way past the server's filter is
    # not a filter on its own: refused, the place pointed at in the client's own text.
    from pipeline.filters import FilterError

    with pytest.raises(FilterError, match=r"found .\). \(at character 15\)"):
        both_filters("in_stock = true", "category = 'x') OR (category IS NOT NULL")
    with pytest.raises(FilterError):
        both_filters("in_stock = true", "price = 5 AND")
    with pytest.raises(FilterError, match="nested too deeply|characters; at most"):  # a 422, not a 500
        both_filters(None, "(" * 990 + "a = 1" + ")" * 990)
    server = "in_stock = true"  # with it, the whole filter must fit: the client is told its own room
    with pytest.raises(FilterError, match=f"filter: 1990 characters; at most {2000 - len(server) - 9} here"):
        both_filters(server, "price = 1 " + " " * 1980)
    assert _json_value(float("nan")) is None and _json_value(1.5) == 1.5


def test_nan_is_missing_and_values_of_another_width_or_kind_compare_as_numbers():
    """NaN is shown as no value (metadata.json_value), so it filters as one; a date without a zone
    on a zoned timestamp column is a time in the column's zone; numbers a column's type cannot
    hold, or of another kind (49.5 for a decimal column), compare instead of failing."""
    import datetime
    import decimal

    table = pa.table({
        "price": pa.array([10, float("nan"), 30, None, 5, 50], pa.float64()),
        "size8": pa.array([1, 2, 255, None, 3, 4], pa.uint8()),
        "dec": pa.array([decimal.Decimal(v) if v else None for v in ["49.5", "10.5", "1", None, "2", "3"]],
                        pa.decimal128(10, 2)),
        "created": pa.array([datetime.datetime(2026, 1, d, 12, tzinfo=datetime.UTC) if d else None
                             for d in [1, 2, 3, None, 4, 5]], pa.timestamp("us", tz="UTC")),
    })

    def match(text: str) -> list[int]:
        return Filter.parse(text, table.schema).mask(table).nonzero()[0].tolist()

    assert match("NOT price < 20") == [2, 5] and match("price IS NULL") == [1, 3] and match("price != 10") == [2, 4, 5]
    assert match("price > 99999999999999999999") == [] and match("price IN (10, 30)") == [0, 2]
    assert match("size8 IN (300, 1)") == [0] and match("size8 IN (-1, 1)") == [0] and match("size8 = 300") == []
    assert match("dec IN (49.5, 10.5)") == [0, 1] and match("dec = 49.5") == [0] and match("dec > 2") == [0, 1, 5]
    assert match("created >= '2026-01-03'") == [2, 4, 5] and match("created < '2026-01-02 13:00'") == [0, 1]
    assert match("created >= '2026-01-03T00:00:00+01:00'") == [2, 4, 5]


def test_in_takes_dates_and_leaves_out_values_a_column_cannot_hold():
    """IN's values go through the same conversion as `=`'s: texts for dates and times (in a zoned
    column's zone), and a value the column's type cannot hold matches nothing instead of failing."""
    import datetime
    import decimal

    table = pa.table({
        "d": pa.array([datetime.date(2026, 1, 31), datetime.date(2026, 2, 1), datetime.date(2026, 2, 2)]),
        "ts": pa.array([datetime.datetime(2026, 1, 31, 10), datetime.datetime(2026, 1, 31, 11), None]),
        "tz": pa.array([datetime.datetime(2026, 1, 31, tzinfo=datetime.UTC), None, None], pa.timestamp("us", tz="UTC")),
        "u64": pa.array([1, 2, 3], pa.uint64()),
        "dec": pa.array([decimal.Decimal("49.5"), decimal.Decimal("10.5"), None], pa.decimal128(10, 2)),
    })

    def match(text: str) -> list[int]:
        return Filter.parse(text, table.schema).mask(table).nonzero()[0].tolist()

    assert match("d IN ('2026-01-31', '2026-02-01')") == [0, 1] and match("d NOT IN ('2026-01-31')") == [1, 2]
    assert match("ts IN ('2026-01-31 10:00:00')") == [0] and match("tz IN ('2026-01-31')") == [0]
    assert match("u64 IN (1, -1)") == [0] and match("u64 NOT IN (-1)") == [0, 1, 2]
    assert match("dec IN (49.555)") == [] and match("dec IN (1e30, 10.5)") == [1] and match("dec IN (49.5)") == [0]
    ns = pa.table({"t": pa.array([1_000_000_001, 5], pa.timestamp("ns"))})  # a nanosecond is no Python datetime
    assert Filter.parse("t IN ('1970-01-01 00:00:01.000000001')", ns.schema).mask(ns).tolist() == [True, False]


def test_a_number_past_the_64_bit_integers_compares_as_sql_does():
    """10**20 is over every int64: `stock < 10**20` is every row with a stock (it was refused as a value
    that does not fit); a fraction beside counts past 2**53 compares in double precision, as the literal."""
    t = pa.table({"stock": pa.array([1, 2, None], pa.int64()), "big": pa.array([2**53 + 1, 2**53, 0], pa.int64()),
                  "u64": pa.array([2**63 + 5, 1, 2], pa.uint64())})

    def mask(text: str) -> list[int]:
        return np.flatnonzero(Filter.parse(text, t.schema).mask(t)).tolist()

    assert mask("stock < 99999999999999999999") == [0, 1]
    assert mask("stock > -99999999999999999999") == [0, 1]
    assert mask("stock = 99999999999999999999") == []
    assert mask("big = 9007199254740993") == [0]  # whole: exact
    assert mask("big IN (9007199254740993, 1.5)") == [0, 1]  # with a fraction: as doubles, 2**53 + 1 is 2**53
    assert mask(f"u64 > {2**63}") == [0]  # an unsigned column holds it: exact


def test_sql_typed_values_and_doubled_quotes_in_names_are_read_as_lancedb_and_duckdb_read_them():
    """`d >= DATE '2026-02-01'` is what LanceDB takes on a date column (a bare text there is an error):
    it was refused here ("texts are quoted", of a quoted text), so no date filter read the same in
    both. A column named with both quote kinds could not be written at all."""
    import datetime

    table = pa.table({
        "d": pa.array([datetime.date(2026, 1, 31), datetime.date(2026, 2, 1), None]),
        "opens": pa.array([datetime.time(9), datetime.time(11), None], pa.time64("us")),
        "ts": pa.array([datetime.datetime(2026, 1, 31, 10), None, datetime.datetime(2026, 3, 1)]),
        'say "hi" `now`': ["a", "b", "c"],
        "name": ["x", "y", "z"],
    })

    def match(text: str) -> list[int]:
        return Filter.parse(text, table.schema).mask(table).nonzero()[0].tolist()

    assert match("d >= DATE '2026-02-01'") == match("d >= '2026-02-01'") == [1]
    assert match("d IN (date '2026-01-31', Date '2026-02-01')") == [0, 1]
    assert match("opens < TIME '10:00'") == [0] and match("ts > TIMESTAMP '2026-02-01 00:00:00'") == [2]
    assert match('"say ""hi"" `now`" = \'b\'') == [1] and match("`say \"hi\" ``now``` IN ('a', 'c')") == [0, 2]
    with pytest.raises(FilterError, match=r"'name' is a text column, compared with DATE '2026-01-31'"):
        Filter.parse("name = DATE '2026-01-31'", table.schema)
    with pytest.raises(FilterError, match=r"'soon' is not a date"):
        Filter.parse("d > DATE 'soon'", table.schema)
    with pytest.raises(FilterError) as e:
        Filter.parse("d > day '2026-01-31'", table.schema)
    assert "found 'day' before a text (a typed value is one of DATE, TIME, TIMESTAMP 'text')" in str(e.value)
    assert "texts are quoted" not in str(e.value)


def test_times_of_day_and_column_names_in_any_alphabet():
    """A CSV's `10:30:00` is a time column: compared with texts ('10:30', '10:30:15.5') at any unit;
    a name such as größe is a column name bare, as in DuckDB; a duration is refused by name."""
    import datetime

    table = pa.table({
        "opens": pa.array([datetime.time(9), datetime.time(10, 30), None, datetime.time(12)], pa.time32("s")),
        "at": pa.array([datetime.time(10, 30, 15, 500000), datetime.time(10, 30, 15)] + [None] * 2, pa.time64("us")),
        "größe": ["M", "L", "M", None],
        "wait": pa.array([1, 2, 3, 4], pa.duration("s")),
    })

    def match(text: str) -> list[int]:
        return Filter.parse(text, table.schema).mask(table).nonzero()[0].tolist()

    assert match("opens < '11:00:00'") == [0, 1] and match("opens >= '10:30'") == [1, 3]
    assert match("opens IN ('09:00', '12:00')") == [0, 3] and match("opens NOT IN ('09:00')") == [1, 3]
    assert match("at > '10:30:15'") == [0] and match("at = '10:30:15.5'") == [0]
    assert match("größe = 'M' AND opens < '10:00'") == [0] and match("NOT größe = 'M'") == [1]
    with pytest.raises(FilterError, match="'opens' is a time column, compared with number 5"):
        Filter.parse("opens = 5", table.schema)
    with pytest.raises(FilterError, match=r"'noon' is not a time of day, 'HH:MM' or 'HH:MM:SS', as column 'opens'"):
        Filter.parse("opens < 'noon'", table.schema)
    with pytest.raises(FilterError, match=r"column 'wait' holds duration\[s\], which a filter cannot compare"):
        Filter.parse("wait > 5", table.schema)
