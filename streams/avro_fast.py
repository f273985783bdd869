"""Avro binary decoders compiled to Python source, one specialised function per writer schema.

`compile_reader(parsed_schema)` returns `read(data, pos)`, which decodes one datum that must
end exactly at `len(data)` and gives the same Python values as fastavro's `schemaless_reader`
(records as dicts, `Decimal` for decimals, tz-aware UTC `datetime` for timestamp-micros, and
fastavro's own logical readers for the rarer logical types). The generated code walks the
bytes with an integer position (no BytesIO, no per-value function call on the common path):
one- and two-byte varints inline, eight-byte ones (timestamps) with one `int.from_bytes`,
strings sliced straight out of the buffer. `read.__avro_source__` holds the source.

The top record, and records in its fields, can be built as dataclasses instead of dicts (see
`Build`); they are built only after the whole body decoded and the end check passed, so a
build or a check never sees a half-read record. A frozen slotted dataclass is built without
its `__init__`: an instance of a private subclass that adds nothing to the layout gets its
slots stored directly and then its `__class__` set to the dataclass (CPython checks that the
layouts match), which is 5-7x cheaper than the frozen `__init__`'s `object.__setattr__` per
field. Only classes whose `__init__` is the one `dataclass` generated, with no
`__post_init__` and no InitVar, are built that way; others through their `__init__`.

Bounds are checked lazily but soundly: the position only moves forward; a slice past the end
is short but still moves the position past the end; every later read either indexes past the
end (IndexError) or reads nothing; and the final `pos == len(data)` check rejects the datum.
Array and map block counts are checked against the bytes left, so a huge count can make the
decoder neither allocate nor loop beyond the size of its input.

Stricter than fastavro on purpose (malformed or absurd input that fastavro accepts; none of it
is anything fastavro's writer produces for an event schema):
- a negative union or enum index (fastavro indexes its Python list from the end);
- a varint longer than 10 bytes or above 64 bits (fastavro wraps it), an int outside 32 bits
  (fastavro's reader and writer both let it through; ClickHouse Int32 columns do not);
- a decimal with more significant digits than its precision (fastavro rounds: money would
  change silently), or more than 64 bytes longer than its precision needs, i.e. above
  10**180 at decimal(38, 12) (converting 1 MB of it would take fastavro minutes);
- an array or map block whose count exceeds the bytes left. Only items that encode to zero
  bytes (null, an empty record) could fit such a count; fastavro allocates whatever count it
  reads (2**62 nulls from 10 bytes). No event schema has such items.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Context, Decimal, DivisionByZero, Inexact, InvalidOperation, Overflow
from functools import cache
from struct import Struct
from typing import Any

from fastavro.read import LOGICAL_READERS

__all__ = ["AvroDecodeError", "Build", "compile_reader", "min_size"]

PRIMITIVES = frozenset({"null", "boolean", "int", "long", "float", "double", "bytes", "string"})
RECORD_TYPES = frozenset({"record", "error"})
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
DECIMAL_CACHE_SIZE = 1024  # per decimal type: recently seen encodings → Decimal (prices repeat)
MAX_INDENT = 12  # deeper values are read by a helper function (Python allows 20 nested loops/try blocks)
DECIMAL_SLACK = 64  # bytes a bytes-decimal may carry beyond what its precision needs (10**154 more)

_STOCK_LOGICAL = dict(LOGICAL_READERS)  # fastavro's own readers: inline only what still means the same


class AvroDecodeError(ValueError):
    """The body is not a valid encoding of the writer schema."""


# One-byte varints. A byte < 0x80 is a whole varint. _ZIGZAG1: its value (None: longer varint).
# _SPAN1: for a length prefix, 1 + the length (0: longer varint, or odd = negative length).
_ZIGZAG1: tuple[int | None, ...] = tuple(((b >> 1) ^ -(b & 1)) if b < 0x80 else None for b in range(256))
_SPAN1: tuple[int, ...] = tuple(1 + (b >> 1) if b < 0x80 and not b & 1 else 0 for b in range(256))

# An 8-byte varint (every timestamp-micros from 1978 to 2541): continuation bits 1,1,1,1,1,1,1,0.
_CONT8, _CONT8_SET = 0x8080808080808080, 0x0080808080808080


def _uvarint(data: bytes, pos: int) -> tuple[int, int]:
    """Raw (not zigzag-decoded) varint at `pos` → (value, position after it). At most 10 bytes, < 2**64."""
    b = data[pos]
    n = b & 0x7F
    shift = 7
    pos += 1
    while b & 0x80:
        if shift > 63:
            raise AvroDecodeError("varint longer than 10 bytes")
        b = data[pos]
        pos += 1
        n |= (b & 0x7F) << shift
        shift += 7
    if n >> 64:
        raise AvroDecodeError("varint above 64 bits")
    return n, pos


def _long(data: bytes, pos: int) -> tuple[int, int]:
    n, pos = _uvarint(data, pos)
    return (n >> 1) ^ -(n & 1), pos


def _int32(data: bytes, pos: int) -> tuple[int, int]:
    n, pos = _long(data, pos)
    if not -0x80000000 <= n <= 0x7FFFFFFF:
        raise AvroDecodeError(f"int out of range: {n}")
    return n, pos


def _span(data: bytes, pos: int) -> tuple[int, int]:
    """Length-prefixed value at `pos` → (start, end) of its bytes. Refuses a negative length."""
    n, pos = _uvarint(data, pos)
    if n & 1:
        raise AvroDecodeError(f"negative length {(n >> 1) ^ -1}")
    return pos, pos + (n >> 1)


def _decimal_converter(precision: int, scale: int) -> tuple[dict[bytes, Decimal], Callable[[bytes], Decimal]]:
    """(cache, convert): convert(two's-complement big-endian bytes) → Decimal, as fastavro does.

    fastavro computes `Context(prec=precision).create_decimal(n).scaleb(-scale, ctx)`. For
    `|n| < 10**precision` that is exactly `Decimal(n).scaleb(-scale, ctx)`: same value, same
    exponent. A larger `n` (fastavro's writer makes one from, say, Decimal("1E+30"): it checks
    the digits it is given, then scales) goes through fastavro's formula, which only drops
    trailing zeros then; if it would drop a non-zero digit, that is refused instead of rounded
    (money must not change silently). More than `DECIMAL_SLACK` bytes beyond what the precision
    needs is refused before converting (int → Decimal is quadratic: 1 MB would take minutes).
    Results are cached by their bytes: a Decimal is immutable, and prices repeat.
    """
    ctx = Context(prec=max(precision, 1), traps=[InvalidOperation, DivisionByZero, Overflow, Inexact])
    limit = 10**precision
    max_len = (limit.bit_length() + 8) // 8 + DECIMAL_SLACK
    neg_scale = -scale
    cache: dict[bytes, Decimal] = {}

    def convert(raw: bytes) -> Decimal:
        if len(raw) > max_len and len(raw.lstrip(b"\xff" if raw[0] & 0x80 else b"\x00")) > max_len:
            raise AvroDecodeError(f"decimal of {len(raw)} bytes exceeds precision {precision}")
        n = int.from_bytes(raw, "big", signed=True)
        if -limit < n < limit:
            value = Decimal(n).scaleb(neg_scale, ctx)
        else:
            try:
                value = ctx.create_decimal(n).scaleb(neg_scale, ctx)
            except Inexact:
                raise AvroDecodeError(f"decimal exceeds precision {precision}: digits would be lost") from None
        if len(cache) >= DECIMAL_CACHE_SIZE:
            cache.clear()
        cache[raw] = value
        return value

    return cache, convert


@dataclass
class Build:
    """Build a record as dataclass `cls` (keyword = Avro field name) instead of a dict.

    `fields` builds record-typed fields of the record the same way (those are built first);
    `check(obj)` runs on each built object before its parent is built.
    """

    cls: type
    fields: dict[str, Build] = field(default_factory=dict)
    check: Callable[[Any], None] | None = None


@cache
def _twin(cls: type) -> type | None:
    """A subclass of `cls` with its layout and generic attribute setting, or None if unsafe.

    An instance of it whose fields are all stored becomes a `cls` made by `cls(**fields)` once
    its `__class__` is set to `cls`. Only for dataclasses with slots, the generated `__init__`
    (it stores each field, nothing else), no `__post_init__`, no InitVar and no own `__new__`.
    """
    if not dataclasses.is_dataclass(cls) or "__slots__" not in cls.__dict__:
        return None
    init = cls.__dict__.get("__init__")
    code = getattr(init, "__code__", None)
    if init is None or code is None or code.co_filename != "<string>" or hasattr(cls, "__post_init__"):
        return None
    if cls.__new__ is not object.__new__:  # type: ignore[comparison-overlap]
        return None
    names = [f.name for f in dataclasses.fields(cls)]
    if list(inspect.signature(init).parameters)[1:] != names or not all(f.init for f in dataclasses.fields(cls)):
        return None
    namespace = {
        "__slots__": (),
        "__init__": object.__init__,
        "__setattr__": object.__setattr__,
        "__delattr__": object.__delattr__,
        "__module__": __name__,
        "__doc__": f"Decoder-private twin of {cls.__qualname__}; never escapes the decoder.",
    }
    twin = type(f"_Decoded{cls.__name__}", (cls,), namespace)
    try:
        probe = twin()
        for name in names:
            setattr(probe, name, None)
        probe.__class__ = cls
    except (TypeError, AttributeError):
        return None
    return twin


def min_size(schema: Any, named: dict[str, Any], _seen: frozenset[str] = frozenset()) -> int:
    """Fewest bytes any value of `schema` encodes to (0 for null, an empty record...)."""
    if isinstance(schema, str):
        if schema in PRIMITIVES:
            return {"null": 0, "boolean": 1, "float": 4, "double": 8}.get(schema, 1)
        if schema in _seen:
            return 0
        return min_size(named[schema], named, _seen | {schema})
    if isinstance(schema, list):
        return 1 + min((min_size(s, named, _seen) for s in schema), default=0)
    t = schema["type"]
    if t in RECORD_TYPES:
        seen = _seen | {schema["name"]}
        return sum(min_size(f["type"], named, seen) for f in schema["fields"])
    if t == "fixed":
        return int(schema["size"])
    if t in ("enum", "array", "map"):
        return 1
    return min_size(t, named, _seen)


def _children(schema: Any) -> list[Any]:
    if isinstance(schema, list):
        return schema
    if isinstance(schema, dict):
        t = schema["type"]
        if t in RECORD_TYPES:
            return [f["type"] for f in schema["fields"]]
        if t == "array":
            return [schema["items"]]
        if t == "map":
            return [schema["values"]]
        if not isinstance(t, str) or t not in ("enum", "fixed"):
            return [t]
    return []


def _collect_named(schema: Any, named: dict[str, Any]) -> None:
    if isinstance(schema, dict) and schema["type"] in (*RECORD_TYPES, "enum", "fixed"):
        if schema["name"] in named:
            return
        named[schema["name"]] = schema
    for child in _children(schema):
        _collect_named(child, named)


def _reaches(schema: Any, target: str, named: dict[str, Any], seen: set[str]) -> bool:
    """Whether named type `target` occurs in `schema` (through references too)."""
    if isinstance(schema, str):
        if schema in PRIMITIVES or schema in seen:
            return False
        if schema == target:
            return True
        seen.add(schema)
        return _reaches(named[schema], target, named, seen)
    if isinstance(schema, dict) and schema["type"] in (*RECORD_TYPES, "enum", "fixed"):
        if schema["name"] == target:
            return True
        if schema["name"] in seen:
            return False
        seen.add(schema["name"])
    return any(_reaches(c, target, named, seen) for c in _children(schema))


class _Function:
    """Source of one generated function: lines, and a counter for fresh local names."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.n = 0

    def var(self, prefix: str = "v") -> str:
        self.n += 1
        return f"{prefix}{self.n}"

    def emit(self, indent: int, line: str) -> None:
        self.lines.append("    " * indent + line)


class _Compiler:
    def __init__(self, schema: Any) -> None:
        self.named: dict[str, Any] = {}
        _collect_named(schema, self.named)
        self.recursive = {
            name
            for name, s in self.named.items()
            if s["type"] in RECORD_TYPES and any(_reaches(f["type"], name, self.named, set()) for f in s["fields"])
        }
        self.consts: dict[str, Any] = {
            "_Z1": _ZIGZAG1,
            "_S1": _SPAN1,
            "_uvarint": _uvarint,
            "_long": _long,
            "_int32": _int32,
            "_span": _span,
            "_E": AvroDecodeError,
            "_EPOCH": EPOCH,
            "_TD": timedelta,
            "_int": int.from_bytes,
            "_DOUBLE": Struct("<d").unpack_from,
            "_FLOAT": Struct("<f").unpack_from,
        }
        self.const_ids: dict[int, str] = {}
        self.functions: list[_Function] = []
        self.record_functions: dict[str, str] = {}
        self.value_functions: dict[int, str] = {}

    def const(self, value: Any, prefix: str) -> str:
        if id(value) not in self.const_ids:
            name = f"_{prefix}{len(self.consts)}"
            self.consts[name] = value
            self.const_ids[id(value)] = name
        return self.const_ids[id(value)]

    # -- readers: each emits code that reads one value into `target` and advances `pos` --

    def read(self, fn: _Function, schema: Any, target: str, ind: int) -> None:
        if ind > MAX_INDENT and not (isinstance(schema, str) and schema in PRIMITIVES):
            fn.emit(ind, f"{target}, pos = {self.value_function(schema)}(data, pos)")
            return
        if isinstance(schema, str):
            if schema in PRIMITIVES:
                self.read_primitive(fn, schema, target, ind)
            elif schema in self.recursive:
                fn.emit(ind, f"{target}, pos = {self.record_function(schema)}(data, pos)")
            else:
                self.read(fn, self.named[schema], target, ind)
        elif isinstance(schema, list):
            self.read_union(fn, schema, target, ind)
        else:
            t = schema["type"]
            logical = schema.get("logicalType")
            reader = LOGICAL_READERS.get(f"{t}-{logical}") if logical and isinstance(t, str) else None
            if reader is not None:
                self.read_logical(fn, schema, f"{t}-{logical}", reader, target, ind)
            elif t in RECORD_TYPES:
                self.read_record(fn, schema, target, ind)
            elif t == "enum":
                self.read_enum(fn, schema, target, ind)
            elif t == "fixed":
                self.read_fixed(fn, schema, target, ind)
            elif t == "array":
                self.read_array(fn, schema, target, ind)
            elif t == "map":
                self.read_map(fn, schema, target, ind)
            else:  # {"type": "string"} and the like
                self.read(fn, t, target, ind)

    def read_primitive(self, fn: _Function, t: str, target: str, ind: int) -> None:
        if t == "null":
            fn.emit(ind, f"{target} = None")
        elif t == "long":
            self.read_long(fn, target, ind)
        elif t == "int":
            self.read_long(fn, target, ind, slow="_int32")
        elif t == "string":
            self.read_span(fn, target, ind, ".decode()")
        elif t == "bytes":
            self.read_span(fn, target, ind, "")
        elif t == "boolean":
            fn.emit(ind, f"{target} = data[pos] != 0")  # any non-zero byte is true, as in fastavro
            fn.emit(ind, "pos += 1")
        elif t == "double":
            fn.emit(ind, f"{target} = _DOUBLE(data, pos)[0]")
            fn.emit(ind, "pos += 8")
        elif t == "float":
            fn.emit(ind, f"{target} = _FLOAT(data, pos)[0]")
            fn.emit(ind, "pos += 4")
        else:  # pragma: no cover - PRIMITIVES is exhaustive
            raise ValueError(t)

    def read_span(self, fn: _Function, target: str, ind: int, suffix: str) -> None:
        """A length-prefixed value: bytes (suffix "") or a string (suffix ".decode()")."""
        e = fn.var("e")
        fn.emit(ind, f"{e} = _S1[data[pos]]")
        fn.emit(ind, f"if {e}:")
        fn.emit(ind + 1, f"{e} += pos")
        fn.emit(ind + 1, f"{target} = data[pos + 1:{e}]{suffix}")
        fn.emit(ind, "else:")
        fn.emit(ind + 1, f"pos, {e} = _span(data, pos)")
        fn.emit(ind + 1, f"{target} = data[pos:{e}]{suffix}")
        fn.emit(ind, f"pos = {e}")

    def read_long(self, fn: _Function, target: str, ind: int, eight: bool = False, slow: str = "_long") -> None:
        """A zigzag varint: one byte inline, then two bytes inline (or eight, for timestamps).

        `slow` reads the other lengths: `_int32` for an int (two bytes never leave its range).
        """
        fn.emit(ind, f"{target} = _Z1[data[pos]]")
        fn.emit(ind, f"if {target} is None:")
        if eight:
            x = fn.var("x")
            fn.emit(ind + 1, f"{x} = _int(data[pos:pos + 8], 'little')")
            fn.emit(ind + 1, f"if {x} & {_CONT8:#x} == {_CONT8_SET:#x}:")
            fn.emit(ind + 2, f"{x} = ({x} & 0x007f007f007f007f) | (({x} & 0x7f007f007f007f00) >> 1)")
            fn.emit(ind + 2, f"{x} = ({x} & 0x00003fff00003fff) | (({x} & 0x3fff00003fff0000) >> 2)")
            fn.emit(ind + 2, f"{x} = ({x} & 0x000000000fffffff) | (({x} & 0x0fffffff00000000) >> 4)")
            fn.emit(ind + 2, f"{target} = ({x} >> 1) ^ -({x} & 1)")
            fn.emit(ind + 2, "pos += 8")
            fn.emit(ind + 1, "else:")
            fn.emit(ind + 2, f"{target}, pos = {slow}(data, pos)")
        else:
            x = fn.var("x")
            fn.emit(ind + 1, f"{x} = data[pos + 1]")
            fn.emit(ind + 1, f"if {x} < 128:")
            fn.emit(ind + 2, f"{x} = (data[pos] & 127) | ({x} << 7)")
            fn.emit(ind + 2, f"{target} = ({x} >> 1) ^ -({x} & 1)")
            fn.emit(ind + 2, "pos += 2")
            fn.emit(ind + 1, "else:")
            fn.emit(ind + 2, f"{target}, pos = {slow}(data, pos)")
        fn.emit(ind, "else:")
        fn.emit(ind + 1, "pos += 1")

    def read_uvarint(self, fn: _Function, target: str, ind: int) -> None:
        fn.emit(ind, f"{target} = data[pos]")
        fn.emit(ind, f"if {target} < 128:")
        fn.emit(ind + 1, "pos += 1")
        fn.emit(ind, "else:")
        fn.emit(ind + 1, f"{target}, pos = _uvarint(data, pos)")

    def read_logical(self, fn: _Function, schema: dict[str, Any], key: str, reader: Any, target: str, ind: int) -> None:
        t = schema["type"]
        stock = reader is _STOCK_LOGICAL.get(key)
        precision, scale = schema.get("precision"), schema.get("scale", 0)
        if (
            stock
            and key in ("bytes-decimal", "fixed-decimal")
            and isinstance(precision, int)
            and isinstance(scale, int)
        ):
            cache, convert = _decimal_converter(precision, scale)
            raw = fn.var("raw")
            if t == "bytes":
                self.read_span(fn, raw, ind, "")
            else:
                self.read_fixed(fn, schema, raw, ind)
            fn.emit(ind, f"{target} = {self.const(cache, 'dcache')}.get({raw})")
            fn.emit(ind, f"if {target} is None:")
            fn.emit(ind + 1, f"{target} = {self.const(convert, 'decimal')}({raw})")
        elif stock and key == "long-timestamp-micros":
            us = fn.var("us")
            self.read_long(fn, us, ind, eight=True)
            fn.emit(ind, f"{target} = _EPOCH + _TD(0, 0, {us})")  # fastavro's formula: OverflowError out of range
        else:  # the rarer logical types: fastavro's own reader on the raw value
            raw = fn.var("raw")
            self.read(fn, {k: v for k, v in schema.items() if k != "logicalType"}, raw, ind)
            fn.emit(ind, f"{target} = {self.const(reader, 'logical')}({raw}, {self.const(schema, 'schema')}, None)")

    def read_union(self, fn: _Function, branches: list[Any], target: str, ind: int) -> None:
        k = fn.var("k")
        self.read_uvarint(fn, k, ind)  # raw varint: branch i is 2 * i; odd means a negative index
        for i, branch in enumerate(branches):
            fn.emit(ind, f"{'if' if i == 0 else 'elif'} {k} == {2 * i}:")
            self.read(fn, branch, target, ind + 1)
        fn.emit(ind, "else:" if branches else "if True:")
        fn.emit(ind + 1, f"raise _E(f'union index {{({k} >> 1) ^ -({k} & 1)}} out of range')")

    def read_enum(self, fn: _Function, schema: dict[str, Any], target: str, ind: int) -> None:
        symbols = tuple(schema["symbols"])
        k = fn.var("k")
        self.read_uvarint(fn, k, ind)
        fn.emit(ind, f"if {k} & 1 or {k} >= {2 * len(symbols)}:")
        fn.emit(ind + 1, f"raise _E(f'enum index {{({k} >> 1) ^ -({k} & 1)}} out of range')")
        fn.emit(ind, f"{target} = {self.const(symbols, 'symbols')}[{k} >> 1]")

    def read_fixed(self, fn: _Function, schema: dict[str, Any], target: str, ind: int) -> None:
        size = int(schema["size"])
        fn.emit(ind, f"{target} = data[pos:pos + {size}]")
        fn.emit(ind, f"pos += {size}")

    def read_blocks(self, fn: _Function, item_min: int, ind: int) -> int:
        """Emit the block loop of an array or map; returns the indent of the per-item body."""
        c = fn.var("c")
        fn.emit(ind, "while True:")
        self.read_long(fn, c, ind + 1)
        fn.emit(ind + 1, f"if {c} <= 0:")
        fn.emit(ind + 2, f"if {c} == 0:")
        fn.emit(ind + 3, "break")
        fn.emit(ind + 2, f"{c} = -{c}")
        fn.emit(ind + 2, "_, pos = _long(data, pos)")  # the block's size in bytes: unused, as in fastavro
        need = f"{c} * {item_min}" if item_min > 1 else c
        fn.emit(ind + 1, f"if {need} > end - pos:")
        fn.emit(ind + 2, f"raise _E(f'block of {{{c}}} items exceeds the {{end - pos}} bytes left')")
        fn.emit(ind + 1, f"for _ in range({c}):")
        return ind + 2

    def read_array(self, fn: _Function, schema: dict[str, Any], target: str, ind: int) -> None:
        items = schema["items"]
        acc, x = fn.var("a"), fn.var("x")
        fn.emit(ind, f"{acc} = []")
        body = self.read_blocks(fn, max(min_size(items, self.named), 1), ind)
        self.read(fn, items, x, body)
        fn.emit(body, f"{acc}.append({x})")
        fn.emit(ind, f"{target} = {acc}")

    def read_map(self, fn: _Function, schema: dict[str, Any], target: str, ind: int) -> None:
        values = schema["values"]
        acc, key, x = fn.var("m"), fn.var("key"), fn.var("x")
        fn.emit(ind, f"{acc} = {{}}")
        body = self.read_blocks(fn, 1 + min_size(values, self.named), ind)
        self.read_primitive(fn, "string", key, body)
        self.read(fn, values, x, body)
        fn.emit(body, f"{acc}[{key}] = {x}")
        fn.emit(ind, f"{target} = {acc}")

    def read_record(self, fn: _Function, schema: dict[str, Any], target: str, ind: int) -> None:
        if schema["name"] in self.recursive:
            fn.emit(ind, f"{target}, pos = {self.record_function(schema['name'])}(data, pos)")
            return
        values = self.read_fields(fn, schema, ind)
        fn.emit(ind, f"{target} = {self.dict_display(schema, values)}")

    def read_fields(self, fn: _Function, schema: dict[str, Any], ind: int) -> list[str]:
        values = []
        for f in schema["fields"]:
            v = fn.var()
            self.read(fn, f["type"], v, ind)
            values.append(v)
        return values

    @staticmethod
    def dict_display(schema: dict[str, Any], values: list[str]) -> str:
        return "{" + ", ".join(f"{f['name']!r}: {v}" for f, v in zip(schema["fields"], values, strict=True)) + "}"

    def record_function(self, name: str) -> str:
        """Name of the function reading record `name`: recursive records are read by a call."""
        if name not in self.record_functions:
            func = f"_record{len(self.record_functions)}"
            self.record_functions[name] = func
            fn = _Function()
            self.functions.append(fn)
            fn.emit(0, f"def {func}(data, pos):")
            fn.emit(1, "end = len(data)")
            values = self.read_fields(fn, self.named[name], 1)
            fn.emit(1, f"return {self.dict_display(self.named[name], values)}, pos")
        return self.record_functions[name]

    def value_function(self, schema: Any) -> str:
        """Name of a function reading a value of `schema`: for values nested too deep to inline."""
        if id(schema) not in self.value_functions:
            func = f"_value{len(self.value_functions)}"
            self.value_functions[id(schema)] = func
            fn = _Function()
            self.functions.append(fn)
            fn.emit(0, f"def {func}(data, pos):")
            fn.emit(1, "end = len(data)")
            self.read(fn, schema, "value", 1)
            fn.emit(1, "return value, pos")
        return self.value_functions[id(schema)]

    # -- the entry point --

    def top(self, schema: Any, build: Build | None, on_error: Callable[..., Exception] | None) -> _Function:
        fn = _Function()
        fn.emit(1, "end = len(data)")
        fn.emit(1, "try:")
        plan: list[str] = []  # construction code, run after the end check
        if build is None:
            result = fn.var()
            self.read(fn, schema, result, 2)
        else:
            if isinstance(schema, str) and schema in self.named:
                schema = self.named[schema]
            if not isinstance(schema, dict) or schema.get("type") not in RECORD_TYPES:
                raise ValueError("Build needs a record schema")
            result = self.build_record(fn, schema, build, plan)
        fn.emit(1, "except Exception as exc:")
        if on_error is None:
            fn.emit(2, "raise _E(f'{type(exc).__name__}: {exc}') from None")
            fn.emit(1, "if pos != end:")
            fn.emit(2, "raise _E(f'datum ends at byte {pos}, input has {end}')")
        else:
            handler = self.const(on_error, "on_error")
            fn.emit(2, f"raise {handler}(exc, pos, end) from None")
            fn.emit(1, "if pos != end:")
            fn.emit(2, f"raise {handler}(None, pos, end)")
        for line in plan:
            fn.emit(1, line)
        fn.emit(1, f"return {result}")
        # constants are default arguments: LOAD_FAST instead of a global lookup
        names = sorted(self.consts)
        fn.lines.insert(0, "def read(data, pos, " + ", ".join(f"{n}={n}" for n in names) + "):")
        return fn

    def build_record(self, fn: _Function, schema: dict[str, Any], build: Build, plan: list[str]) -> str:
        """Read a record's fields (inside the try) and plan its construction (after it)."""
        cls = build.cls
        if not dataclasses.is_dataclass(cls):
            raise TypeError(f"{cls!r} is not a dataclass")
        names = [f["name"] for f in schema["fields"]]
        params = [f.name for f in dataclasses.fields(cls)]
        if sorted(params) != sorted(names):
            raise ValueError(f"{schema['name']}: fields {names} are not {cls.__name__}'s {params}")
        if set(build.fields) - set(names):
            raise ValueError(f"{schema['name']}: no fields {sorted(set(build.fields) - set(names))}")
        values: dict[str, str] = {}
        for f in schema["fields"]:
            sub = build.fields.get(f["name"])
            if sub is None:
                v = fn.var()
                self.read(fn, f["type"], v, 2)
                values[f["name"]] = v
                continue
            t = f["type"]
            if isinstance(t, str) and t in self.named:
                t = self.named[t]
            if not isinstance(t, dict) or t.get("type") not in RECORD_TYPES or t["name"] in self.recursive:
                raise ValueError(f"{schema['name']}.{f['name']}: only a plain record field can be built")
            values[f["name"]] = self.build_record(fn, t, sub, plan)
        obj = fn.var("obj")
        target = self.const(cls, "cls")
        twin = _twin(cls)
        if twin is None:
            plan.append(f"{obj} = {target}({', '.join(values[p] for p in params)})")
        else:
            plan.append(f"{obj} = {self.const(twin, 'twin')}()")
            plan.extend(f"{obj}.{p} = {values[p]}" for p in params)
            plan.append(f"{obj}.__class__ = {target}")
        if build.check is not None:
            plan.append(f"{self.const(build.check, 'check')}({obj})")
        return obj

    def source(self, main: _Function) -> str:
        return "\n".join("\n".join(f.lines) for f in [*self.functions, main]) + "\n"


def compile_reader(
    schema: Any,
    build: Build | None = None,
    *,
    on_error: Callable[[BaseException | None, int, int], Exception] | None = None,
) -> Callable[[bytes, int], Any]:
    """`read(data, pos)`: decode the datum of `schema` (a fastavro-parsed schema) from `data[pos:]`.

    `data` must be `bytes` and the datum must end exactly at `len(data)`. Malformed input
    raises `AvroDecodeError`, or what `on_error(exc, pos, end)` returns: `exc` is the decoding
    exception, or None when the datum ended at `pos` but the input at `end` (pos < end:
    trailing bytes; pos > end: truncated). What `build` classes and checks raise propagates.
    """
    compiler = _Compiler(schema)
    main = compiler.top(schema, build, on_error)
    src = compiler.source(main)
    namespace = dict(compiler.consts)
    exec(compile(src, f"<avro reader {_schema_name(schema)}>", "exec"), namespace)  # our own generated code
    read: Callable[[bytes, int], Any] = namespace["read"]
    read.__avro_source__ = src  # type: ignore[attr-defined]
    return read


def _schema_name(schema: Any) -> str:
    if isinstance(schema, dict):
        return str(schema.get("name", schema.get("type")))
    return str(schema)
