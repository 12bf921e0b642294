"""Metadata filters: `--filter "category = 'dress' AND price < 50"`, the SQL-like form LanceDB and
DuckDB users know, parsed (never evaluated as Python) into a tree and run by pyarrow.compute over a
gallery's metadata table (metadata.py), giving the rows that match.

Grammar (keywords in any case):

    filter     := or
    or         := and ("OR" and)*
    and        := not ("AND" not)*
    not        := "NOT" not | "(" filter ")" | test
    test       := column op value
                | column ["NOT"] "IN" "(" value ("," value)* ")"
                | column "IS" ["NOT"] "NULL"
    op         := "=" | "!=" | "<>" | "<" | "<=" | ">" | ">="
    value      := 'text' ('' inside is a quote) | number | TRUE | FALSE
    column     := name | "quoted name" | `quoted name`

Comparisons with a missing (null) value are false, as in SQL, and so is NOT of them. `check` holds a
parsed filter against a table's columns and their types (an unknown column, or a text compared with
a number, is an error naming both); errors point at the place in the text.
"""

from __future__ import annotations

import difflib
import re
import unicodedata
from dataclasses import dataclass
from typing import Any

import numpy as np

from .dataset import arrow_numpy
from .errors import UsageError, first_line

OPS = ("=", "!=", "<>", "<=", ">=", "<", ">")
MAX_FILTER_CHARS = 2000


class FilterError(UsageError):
    """A filter that cannot be used: bad syntax, an unknown column, a type mismatch (exit 2)."""


def _point(text: str, at: int, message: str) -> FilterError:
    return FilterError(f"--filter: {message} (at character {at + 1})\n  {text}\n  {' ' * at}^")


# ----------------------------------------------------------------------------- tree
@dataclass(frozen=True)
class Test:
    """column op value(s). op: one of OPS, "in", "not in", "is null", "is not null"."""

    column: str
    op: str
    values: tuple[Any, ...]
    at: int  # where the column name starts in the text


@dataclass(frozen=True)
class Not:
    arg: Any


@dataclass(frozen=True)
class And:
    args: tuple[Any, ...]


@dataclass(frozen=True)
class Or:
    args: tuple[Any, ...]


Node = Test | Not | And | Or


# ----------------------------------------------------------------------------- tokens
_TOKEN = re.compile(
    r"""\s*(?:
      (?P<text>'(?:[^']|'')*')
    | (?P<open_text>'[^']*$)
    | (?P<quoted>"(?:[^"]|"")+"|`(?:[^`]|``)+`)
    | (?P<number>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)(?![A-Za-z_])
    | (?P<op><=|>=|!=|<>|=|<|>)
    | (?P<punct>[(),])
    | (?P<word>[^\W\d][\w.]*)
    | (?P<bad>\S)
    )""",
    re.VERBOSE,
)
class TypedText(str):
    """A text written as SQL's typed value (DATE '2026-01-31'): compared as the text alone, and only
    with a date or time column."""

    def __new__(cls, value: str, sql_type: str) -> TypedText:
        made = super().__new__(cls, value)
        made.sql_type = sql_type
        return made

    sql_type: str


KEYWORDS = {"and", "or", "not", "in", "is", "null", "true", "false"}
TYPED_LITERALS = {"date", "time", "timestamp"}  # DATE '2026-01-31': SQL's form, the same value as the bare text


@dataclass(frozen=True)
class _Tok:
    kind: str  # text | number | op | punct | word | quoted | end
    value: Any
    at: int


def _tokens(text: str) -> list[_Tok]:
    out, pos = [], 0
    while True:
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            break
        kind = m.lastgroup or "bad"
        at = m.start(kind)
        raw = m.group(kind)
        if kind == "bad":
            raise _point(text, at, f"unexpected character {raw!r}")
        if kind == "open_text":
            raise _point(text, at, "a quoted text is not closed (a quote inside a text is written '')")
        if kind == "text":
            out.append(_Tok("text", raw[1:-1].replace("''", "'"), at))
        elif kind == "number":
            out.append(_Tok("number", float(raw) if any(c in raw for c in ".eE") else int(raw), at))
        elif kind == "quoted":  # a quote of its own kind inside is doubled, as in SQL
            out.append(_Tok("column", raw[1:-1].replace(raw[0] * 2, raw[0]), at))
        elif kind == "word":
            low = raw.lower()
            out.append(_Tok(low if low in KEYWORDS else "column", low if low in KEYWORDS else raw, at))
        else:
            out.append(_Tok(kind, raw, at))
        pos = m.end()
    out.append(_Tok("end", None, len(text.rstrip())))
    return out


# ----------------------------------------------------------------------------- parser
class _Parser:
    def __init__(self, text: str) -> None:
        text = unicodedata.normalize("NFC", text)  # as the catalogue's texts and names are (in_one_unicode_form)
        self.text, self.toks, self.i = text, _tokens(text), 0

    @property
    def tok(self) -> _Tok:
        return self.toks[self.i]

    def take(self, kind: str, value: Any = None) -> _Tok | None:
        t = self.tok
        if t.kind == kind and (value is None or t.value == value):
            self.i += 1
            return t
        return None

    def expect(self, kind: str, what: str, value: Any = None) -> _Tok:
        t = self.take(kind, value)
        if t is None:
            raise _point(self.text, self.tok.at, f"expected {what}, found {self._said(self.tok)}")
        return t

    @staticmethod
    def _said(t: _Tok) -> str:
        if t.kind == "end":
            return "the end of the filter"
        if t.kind == "text":
            return f"the text '{t.value}'"
        return f"{t.value!r}" if t.kind != "number" else f"the number {t.value}"

    def parse(self) -> Node:
        if self.tok.kind == "end":
            raise _point(self.text, 0, "the filter is empty")
        node = self.or_()
        if self.tok.kind != "end":
            raise _point(self.text, self.tok.at, f"expected AND, OR or the end, found {self._said(self.tok)}")
        return node

    def or_(self) -> Node:
        args = [self.and_()]
        while self.take("or"):
            args.append(self.and_())
        return args[0] if len(args) == 1 else Or(tuple(args))

    def and_(self) -> Node:
        args = [self.not_()]
        while self.take("and"):
            args.append(self.not_())
        return args[0] if len(args) == 1 else And(tuple(args))

    def not_(self) -> Node:
        if self.take("not"):
            return Not(self.not_())
        if self.take("punct", "("):
            node = self.or_()
            self.expect("punct", "')'", ")")
            return node
        return self.test()

    def test(self) -> Node:
        col = self.tok
        if col.kind != "column":
            raise _point(self.text, col.at, f"expected a column name, found {self._said(col)}")
        self.i += 1
        if self.take("is"):
            negated = self.take("not") is not None
            self.expect("null", "NULL after IS")
            return Test(col.value, "is not null" if negated else "is null", (), col.at)
        negated = self.take("not") is not None
        if negated or self.tok.kind == "in":
            self.expect("in", "IN after NOT")
            self.expect("punct", "'(' after IN", "(")
            values = [self.value()]
            while self.take("punct", ","):
                values.append(self.value())
            self.expect("punct", "')' or ',' in the IN list", ")")
            return Test(col.value, "not in" if negated else "in", tuple(values), col.at)
        op = self.expect("op", f"a comparison (one of {', '.join(OPS)}), IN or IS after {col.value!r}")
        return Test(col.value, "!=" if op.value == "<>" else op.value, (self.value(),), col.at)

    def value(self) -> Any:
        t = self.tok
        if t.kind in ("text", "number"):
            self.i += 1
            return t.value
        if t.kind in ("true", "false"):
            self.i += 1
            return t.kind == "true"
        typed = t.kind == "column" and self.toks[self.i + 1].kind == "text"
        if typed and t.value.lower() in TYPED_LITERALS:  # SQL's DATE '2026-01-31', as LanceDB and DuckDB take it
            self.i += 2
            return TypedText(self.toks[self.i - 1].value, t.value.upper())  # read as the column's type reads a text
        if typed:
            raise _point(self.text, t.at, f"expected a value, found {self._said(t)} before a text (a typed value "
                                          f"is one of {', '.join(sorted(TYPED_LITERALS)).upper()} 'text')")
        hint = f" (texts are quoted: '{str(t.value).replace(chr(39), chr(39) * 2)}')" if t.kind == "column" else ""
        if t.kind == "column" and self.text[t.at:t.at + 1] == '"':  # "red": SQL's name of a column, not a text
            hint = (f" (double quotes name a column, as in SQL; a text is in single quotes: "
                    f"'{str(t.value).replace(chr(39), chr(39) * 2)}')")
        if t.kind == "null":
            hint = " (a missing value is tested with IS NULL, or IS NOT NULL)"
        raise _point(self.text, t.at, f"expected a value, found {self._said(t)}{hint}")


def parse_filter(text: str) -> Node:
    """The filter's tree; FilterError (a message pointing at the place) when it cannot be parsed."""
    return _Parser(text).parse()


def parse_bounded(text: str, most: int = MAX_FILTER_CHARS, what: str = "--filter", where: str = "") -> Node:
    """parse_filter for text from outside: at most `most` characters (`where`: said after the bound),
    and a nesting too deep for the parser's recursion is a FilterError too (exit 2, an HTTP 422),
    not a crash."""
    if len(text) > most:
        raise FilterError(f"{what}: {len(text)} characters; at most {most}{where}")
    try:
        return parse_filter(text)
    except RecursionError:
        raise FilterError(f"{what}: nested too deeply") from None


def columns_of(node: Node) -> list[Test]:
    if isinstance(node, Test):
        return [node]
    if isinstance(node, Not):
        return columns_of(node.arg)
    return [t for a in node.args for t in columns_of(a)]


# ----------------------------------------------------------------------------- types and evaluation
def column_kind(arrow_type: Any) -> str:
    """boolean | number | text | date | time | other: how a filter compares a column of this arrow type."""
    return _kind(arrow_type)


def _kind(arrow_type: Any) -> str:
    import pyarrow as pa

    t = arrow_type
    if pa.types.is_boolean(t):
        return "boolean"
    if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t):
        return "number"
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_dictionary(t):
        return "text"
    if pa.types.is_time(t):
        return "time"
    if pa.types.is_date(t) or pa.types.is_timestamp(t):
        return "date"
    return "other"  # a duration, an interval, a list: nothing a filter's literal says


def _value_kind(v: Any) -> str:
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, (int, float)):
        return "number"
    return "text"


# what a filter over a store without metadata is told (a group-by says the same)
NO_COLUMNS = ("none (the store keeps no metadata: a dataset's other columns, or an image folder's metadata.csv, "
              "are kept when the gallery is built)")


def check_filter(node: Node, text: str, schema: Any) -> None:
    """Every column exists in the table and is compared with values of its type (dates with texts
    such as '2026-01-31'); FilterError otherwise."""
    names = list(schema.names)
    for t in columns_of(node):
        if t.column not in names:
            shown = ", ".join(n for n in names if n != "source_row")
            near = difflib.get_close_matches(t.column.lower(), [n.lower() for n in names if n != "source_row"], 1, 0.75)
            meant = next((f"did you mean {n!r}? " for n in names if near and n.lower() == near[0]), "")
            raise _point(text, t.at, f"unknown column {t.column!r}; {meant}the catalogue's columns are: "
                                     f"{shown or NO_COLUMNS}")
        kind = _kind(schema.field(t.column).type)
        for v in t.values:
            vk = _value_kind(v)
            if isinstance(v, TypedText) and kind not in ("date", "time"):
                raise _point(text, t.at, f"type mismatch: {t.column!r} is a {kind} column, compared with "
                                         f"{v.sql_type} '{v}'")
            if kind in ("date", "time") and vk == "text":
                _check_temporal(text, t, v, schema.field(t.column).type)
                continue
            if kind == "other":
                held = schema.field(t.column).type
                raise _point(text, t.at, f"column {t.column!r} holds {held}, which a filter cannot compare")
            if vk != kind:
                raise _point(text, t.at, f"type mismatch: {t.column!r} is a {kind} column, compared with {vk} {v!r}"
                             + _kind_hint(t, v, kind, vk))
        if t.op in ("<", "<=", ">", ">=") and kind == "boolean":
            raise _point(text, t.at, f"{t.column!r} is true/false: compare it with = or !=")


def _kind_hint(t: Test, v: Any, kind: str, vk: str) -> str:
    """How to write the value for its column: a number bare, a text quoted (with the test's own column)."""
    op = t.op if t.op in ("=", "!=", "<", "<=", ">", ">=") else t.op.upper() if t.op in ("in", "not in") else "="
    column = t.column if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", t.column) else '"' + t.column.replace('"', '""') + '"'
    listed = op in ("IN", "NOT IN")  # each value of the list written the same way: the first shown
    if kind == "number" and vk == "text":
        try:
            said = f"{float(v):g}"
        except ValueError:
            said = "50"
            if not listed:
                return f" (a number column is compared with numbers, written bare: {column} {op} 50)"
        return f" (leave numbers bare: {column} {op} ({said}, …))" if listed else \
            f" (leave a number bare: {column} {op} {said})"
    if kind == "text" and vk == "number":
        said = f"'{v:g}'" if isinstance(v, float) else f"'{v}'"
        return f" (quote texts: {column} {op} ({said}, …))" if listed else f" (quote a text: {column} {op} {said})"
    return ""


def _check_temporal(text: str, t: Test, value: str, arrow_type: Any) -> None:
    """A text a date, date-time or time column is compared with: one its type reads, else a
    FilterError pointing at it with the forms it takes (not Arrow's 'Failed to parse string')."""
    import pyarrow as pa

    try:
        _scalar(value, arrow_type)
    except (pa.ArrowException, ValueError, OverflowError) as e:
        why = str(e)
        if "doesn't exist in timezone" in why or "is ambiguous in timezone" in why:  # a clock change's hour
            how = "does not exist" if "doesn't exist" in why else "is there twice"
            said = (f"{value!r} {how} in the time zone of column {t.column!r}, {arrow_type.tz} (a clock change): "
                    "give it with its offset, e.g. '2026-03-29 03:30+02:00'")
            raise _point(text, t.at, said) from None
        if pa.types.is_date(arrow_type):
            forms = "a date, 'YYYY-MM-DD'"
        elif pa.types.is_time(arrow_type):
            forms = "a time of day, 'HH:MM' or 'HH:MM:SS'"
        else:
            forms = "a date or date-time, 'YYYY-MM-DD' or 'YYYY-MM-DD HH:MM[:SS]'"
        raise _point(text, t.at, f"{value!r} is not {forms}, as column {t.column!r} ({arrow_type}) holds") from None


def _evaluate(node: Node, table: Any) -> Any:
    """A pyarrow boolean array (nulls where a comparison met a missing value)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(node, And):
        out = _evaluate(node.args[0], table)
        for a in node.args[1:]:
            out = pc.and_kleene(out, _evaluate(a, table))
        return out
    if isinstance(node, Or):
        out = _evaluate(node.args[0], table)
        for a in node.args[1:]:
            out = pc.or_kleene(out, _evaluate(a, table))
        return out
    if isinstance(node, Not):
        return pc.invert(_evaluate(node.arg, table))
    col = table.column(node.column)
    if pa.types.is_dictionary(col.type):
        col = col.cast(col.type.value_type)
    if pa.types.is_time(col.type):  # compared at the finest unit, which every time's value takes exactly
        col = col.cast(pa.time64("ns"))
    if pa.types.is_floating(col.type):  # NaN is a missing value, as shown (metadata.json_value): never matches
        col = pc.if_else(pc.is_nan(col), pa.scalar(None, col.type), col)
    if node.op == "is null":
        return pc.is_null(col)
    if node.op == "is not null":
        return pc.is_valid(col)
    if pa.types.is_integer(col.type) and any(_beyond_integers(v, col.type) for v in node.values):
        # 49.5 must not become 49, and 10**20 is over every int64: compared as SQL does, in double
        # precision (a count over 2**53 rounded to the nearest double, as such a literal is)
        col = col.cast(pa.float64(), safe=False)
        values = [pa.scalar(float(v), pa.float64()) if _is_number(v) else _scalar(v, col.type) for v in node.values]
    else:
        values = [_scalar(v, col.type) for v in node.values]
    if node.op in ("in", "not in"):
        found = pc.is_in(col, value_set=pa.array(_held(values, col.type), type=col.type), skip_nulls=True)
        found = pc.if_else(pc.is_null(col), pa.scalar(None, pa.bool_()), found)
        return pc.invert(found) if node.op == "not in" else found
    fn = {"=": pc.equal, "!=": pc.not_equal, "<": pc.less, "<=": pc.less_equal, ">": pc.greater,
          ">=": pc.greater_equal}[node.op]
    return fn(col, values[0])


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _beyond_integers(value: Any, arrow_type: Any) -> bool:
    """A number an integer column cannot be compared with as an integer: a fraction, or a whole number
    past the 64-bit integers of the column's kind."""
    import pyarrow as pa

    if not _is_number(value):
        return False
    top = 2**64 if pa.types.is_unsigned_integer(arrow_type) else 2**63
    return isinstance(value, float) or not -(2**63) <= value < top


def _held(values: list[Any], arrow_type: Any) -> list[Any]:
    """IN's values (scalars from _scalar) as the column's type can hold them: a value it cannot
    (-1 for an unsigned column, 49.555 for one of two decimals, 1e30 for a small decimal) equals
    none of its values and is left out, as `=` finds nothing for it."""
    import pyarrow as pa

    held = []
    for v in values:
        try:
            held.append(v.cast(arrow_type))  # kept as Arrow scalars: a nanosecond is no Python datetime
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, OverflowError):
            continue
    return held


def _fitted(value: Any, arrow_type: Any) -> Any:
    """A filter's value as a Python value of the column's type where it is another's (a float for a
    float column, a Decimal for a decimal one: 49.5 is Decimal('49.5'), not its binary float);
    a value the type cannot hold (300 for a uint8 column) is left to _scalar."""
    import decimal

    import pyarrow as pa

    if pa.types.is_floating(arrow_type) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if pa.types.is_decimal(arrow_type) and isinstance(value, (int, float)) and not isinstance(value, bool):
        return decimal.Decimal(repr(value))
    return value


def _scalar(value: Any, arrow_type: Any) -> Any:
    import pyarrow as pa

    value = _fitted(value, arrow_type)

    if pa.types.is_timestamp(arrow_type) and arrow_type.tz is not None and isinstance(value, str):
        try:
            return pa.scalar(value).cast(arrow_type)
        except pa.ArrowInvalid:  # '2026-01-31' or '2026-01-31 10:00', no zone: a time in the column's own zone
            import pyarrow.compute as pc

            return pc.assume_timezone(pa.scalar(value).cast(pa.timestamp(arrow_type.unit)), arrow_type.tz)
    if pa.types.is_time(arrow_type) and isinstance(value, str):  # '10:30', '10:30:15.5': Arrow casts no text to a time
        import datetime

        return pa.scalar(datetime.time.fromisoformat(value.strip()), pa.time64("ns"))
    if pa.types.is_temporal(arrow_type) and isinstance(value, str):
        return pa.scalar(value).cast(arrow_type)
    if pa.types.is_integer(arrow_type) and isinstance(value, float):
        return pa.scalar(value, pa.float64())
    try:
        return pa.scalar(value, arrow_type)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
        return pa.scalar(value)


@dataclass(frozen=True)
class Filter:
    """A parsed, checked filter and its text."""

    text: str
    node: Node

    @classmethod
    def parse(cls, text: str, schema: Any) -> Filter:
        text = unicodedata.normalize("NFC", text)  # the places a message points at are the parser's
        node = parse_bounded(text)
        check_filter(node, text, schema)
        return cls(text, node)

    def mask(self, table: Any) -> np.ndarray:
        """bool (table rows,): the rows that match (a missing value never matches). A value the
        column's type cannot take ('yesterday' for a date) is a FilterError, not a crash."""
        import pyarrow as pa
        import pyarrow.compute as pc

        try:
            found = pc.fill_null(_evaluate(self.node, table), False)
        except (pa.ArrowException, OverflowError, TypeError, ValueError, RecursionError) as e:
            raise FilterError(f"--filter {self.text!r}: a value does not fit its column ({first_line(e)})") from None
        return np.asarray(arrow_numpy(found), bool)
