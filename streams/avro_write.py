"""Avro binary encoders compiled to Python source, one specialised function per schema.

`compile_writer(parsed_schema)` returns `write(obj) -> bytes` giving exactly the bytes of
fastavro's `schemaless_writer` for the values it accepts (tests/test_avro_write.py holds the
two together on random values of every event schema and of synthetic schemas). Why: the
ledger worker encodes one `LedgerEntryChained` per audit record, and fastavro's generic writer
(plus `Event.to_record()` building two dicts) was a quarter of the worker's time.

The generated code appends to one `bytearray` and reads the values straight from the event:
attributes for the records named in `attr_records` (the event dataclass and its Envelope),
items for other records (the TypedDicts nested in some events). It is strict on purpose: a
value of any type but the expected one (a bool for a long, an int for a double, bytearray
for bytes, a tuple-notation union value, a record missing a key that fastavro would default,
a naive datetime...) raises, and the caller (`streams.codec.Codec.encode`) then asks fastavro,
so odd input gets fastavro's bytes or fastavro's error, never bytes of our own.

Logical types: timestamp-micros of a UTC datetime is inlined; every other logical value goes
through fastavro's own `LOGICAL_WRITERS` function, as fastavro does. Schemas with a union of
more than one non-null branch, or a recursive type, are not compiled (`NotCompilable`): the
caller keeps fastavro for them.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from struct import Struct
from typing import Any

from fastavro.logical_writers import LOGICAL_WRITERS

from streams.avro_fast import _twin

__all__ = ["NotCompilable", "compile_writer", "unchecked_twin"]

PRIMITIVES = frozenset({"null", "boolean", "int", "long", "float", "double", "bytes", "string"})
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
ONE_US = timedelta(microseconds=1)
MAX_DEPTH = 40

# zigzag(n) of a long → its varint bytes, for the one-byte values (small ints)
_VARINT1 = tuple(bytes([u]) for u in range(128))


# length n → the varint of its zigzag (2n), for the lengths most strings and bytes have
_LENGTHS = tuple(_VARINT1[2 * n] if n < 64 else bytes((((2 * n) & 0x7F) | 0x80, (2 * n) >> 7)) for n in range(8192))


class NotCompilable(ValueError):
    """The schema uses something the compiled writer does not handle; use fastavro for it."""


# n bytes of varint -> the continuation bits of its first n - 1 bytes
_CONTINUED = tuple(sum(0x80 << (8 * i) for i in range(n - 1)) for n in range(10))


def _uvarint(u: int) -> bytes:
    """Varint of an unsigned value below 2**64 (already zigzag-encoded)."""
    if u < 0x80:
        return _VARINT1[u]
    if u < 0x4000:
        return bytes(((u & 0x7F) | 0x80, u >> 7))
    if u < 0x100000000000000:  # up to 8 bytes (times in micros are 8): its 7-bit groups spread to bytes at once
        n = (u.bit_length() + 6) // 7
        spread = (
            (u & 0x7F) | ((u & 0x3F80) << 1) | ((u & 0x1FC000) << 2) | ((u & 0xFE00000) << 3)
            | ((u & 0x7F0000000) << 4) | ((u & 0x3F800000000) << 5) | ((u & 0x1FC0000000000) << 6)
            | ((u & 0xFE000000000000) << 7)
        )  # fmt: skip
        return (spread | _CONTINUED[n]).to_bytes(n, "little")
    out = bytearray()
    while u >= 0x80:
        out.append((u & 0x7F) | 0x80)
        u >>= 7
    out.append(u)
    return bytes(out)


def _long(n: int) -> bytes:
    """Zigzag varint of a 64-bit signed int; anything else raises (fastavro decides then)."""
    if type(n) is not int or not -0x8000000000000000 <= n <= 0x7FFFFFFFFFFFFFFF:
        raise TypeError(f"not a 64-bit int: {n!r}")
    return _uvarint((n << 1) ^ (n >> 63))


def _micros(value: Any, schema: Any, prepare: Callable[[Any, Any], Any]) -> int:
    """timestamp-micros: a UTC datetime inline (fastavro's formula is the exact delta), else fastavro's."""
    if type(value) is datetime and value.tzinfo is UTC:
        return (value - EPOCH) // ONE_US
    if type(value) is not datetime or value.tzinfo is None:
        raise TypeError("naive or non-datetime timestamp: fastavro decides")
    result: int = prepare(value, schema)
    return result


class _Code:
    """Source lines of one function, and fresh local names."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.n = 0

    def var(self, stem: str = "v") -> str:
        self.n += 1
        return f"{stem}{self.n}"

    def emit(self, indent: int, line: str) -> None:
        self.lines.append("    " * indent + line)


class _Compiler:
    def __init__(self, schema: Any, attr_records: frozenset[str]) -> None:
        self.named: dict[str, Any] = {}
        self.attr_records = attr_records
        self.consts: dict[str, Any] = {
            "_V1": _VARINT1,
            "_LEN": _LENGTHS,
            "_uv": _uvarint,
            "_long": _long,
            "_micros": _micros,
            "_d": Struct("<d").pack,
            "_f": Struct("<f").pack,
            "_Decimal": Decimal,
            "_datetime": datetime,
            "_UTC": UTC,
            "_EPOCH": EPOCH,
            "_ONE_US": ONE_US,
        }
        self._collect(schema, ())

    def _collect(self, schema: Any, stack: tuple[str, ...]) -> None:
        if isinstance(schema, list):
            for s in schema:
                self._collect(s, stack)
        elif isinstance(schema, dict):
            t = schema.get("type")
            if t in ("record", "error", "enum", "fixed"):
                self.named.setdefault(schema["name"], schema)
            if t in ("record", "error"):
                for f in schema["fields"]:
                    self._collect(f["type"], (*stack, schema["name"]))
            elif t == "array":
                self._collect(schema["items"], stack)
            elif t == "map":
                self._collect(schema["values"], stack)
            elif isinstance(t, dict | list):
                self._collect(t, stack)

    def const(self, value: Any, stem: str) -> str:
        name = f"_{stem}{len(self.consts)}"
        self.consts[name] = value
        return name

    def write(self, code: _Code, schema: Any, expr: str, indent: int, depth: int = 0) -> None:
        """Emit code appending the encoding of value `expr` of `schema` to `out`."""
        if depth > MAX_DEPTH:
            raise NotCompilable("schema nested too deep (or recursive)")
        if isinstance(schema, str):
            if schema in PRIMITIVES:
                self.primitive(code, schema, expr, indent)
                return
            if schema not in self.named:
                raise NotCompilable(f"unknown type {schema!r}")
            schema = self.named[schema]
        if isinstance(schema, list):
            self.union(code, schema, expr, indent, depth)
            return
        t = schema["type"]
        logical = schema.get("logicalType")
        if logical is not None and isinstance(t, str):
            key = f"{t}-{logical}"
            prepare = LOGICAL_WRITERS.get(key)
            if prepare is not None:
                self.logical(code, schema, key, prepare, expr, indent, depth)
                return
        if t in ("record", "error"):
            attr = schema["name"] in self.attr_records
            for f in schema["fields"]:
                name = f["name"]
                if not name.isidentifier():
                    raise NotCompilable(f"field name {name!r}")
                v = code.var()
                code.emit(indent, f"{v} = {expr}.{name}" if attr else f"{v} = {expr}[{name!r}]")
                self.write(code, f["type"], v, indent, depth + 1)
        elif t == "enum":
            index = self.const({s: _long(i) for i, s in enumerate(schema["symbols"])}, "enum")
            code.emit(indent, f"out += {index}[{expr}]")
        elif t == "fixed":
            size = int(schema["size"])
            code.emit(indent, f"if type({expr}) not in (bytes, bytearray) or len({expr}) != {size}:")
            code.emit(indent + 1, "raise TypeError('fixed')")
            code.emit(indent, f"out += {expr}")
        elif t in ("array", "map"):
            n, item = code.var("n"), code.var("item")
            code.emit(indent, f"{n} = len({expr})")
            code.emit(indent, f"if {n}:")
            code.emit(indent + 1, f"out += _long({n})")
            if t == "array":
                code.emit(indent + 1, f"for {item} in {expr}:")
                self.write(code, schema["items"], item, indent + 2, depth + 1)
            else:
                key = code.var("k")
                code.emit(indent + 1, f"for {key}, {item} in {expr}.items():")
                self.primitive(code, "string", key, indent + 2)
                self.write(code, schema["values"], item, indent + 2, depth + 1)
            code.emit(indent, "out += b'\\x00'")
        elif isinstance(t, str | dict | list):
            self.write(code, t, expr, indent, depth + 1)  # {"type": "string"} and the like
        else:
            raise NotCompilable(f"type {t!r}")

    def primitive(self, code: _Code, t: str, expr: str, indent: int) -> None:
        if t == "null":
            code.emit(indent, f"if {expr} is not None:")
            code.emit(indent + 1, "raise TypeError('null')")
        elif t == "boolean":
            code.emit(indent, f"if type({expr}) is not bool:")
            code.emit(indent + 1, "raise TypeError('boolean')")
            code.emit(indent, f"out += b'\\x01' if {expr} else b'\\x00'")
        elif t in ("int", "long"):  # non-negative values (versions, offsets, times) without _long's checks
            code.emit(indent, f"if type({expr}) is int and 0 <= {expr} < 0x4000000000000000:")
            code.emit(indent + 1, f"out += _V1[{expr} << 1] if {expr} < 64 else _uv({expr} << 1)")
            code.emit(indent, "else:")
            code.emit(indent + 1, f"out += _long({expr})")
        elif t in ("float", "double"):
            code.emit(indent, f"if type({expr}) is not float:")
            code.emit(indent + 1, f"raise TypeError({t!r})")
            code.emit(indent, f"out += {'_d' if t == 'double' else '_f'}({expr})")
        elif t in ("string", "bytes"):
            b, n = code.var("b"), code.var("n")
            if t == "string":
                code.emit(indent, f"if type({expr}) is not str:")
                code.emit(indent + 1, "raise TypeError('string')")
                code.emit(indent, f"{b} = {expr}.encode()")
            else:
                code.emit(indent, f"if type({expr}) is not bytes:")
                code.emit(indent + 1, "raise TypeError('bytes')")
                code.emit(indent, f"{b} = {expr}")
            code.emit(indent, f"{n} = len({b})")
            code.emit(indent, f"out += _LEN[{n}] if {n} < 8192 else _uv({n} << 1)")
            code.emit(indent, f"out += {b}")
        else:
            raise NotCompilable(t)

    def union(self, code: _Code, branches: list[Any], expr: str, indent: int, depth: int) -> None:
        others = [i for i, b in enumerate(branches) if b != "null"]
        if len(others) != 1 or len(branches) > 2:
            raise NotCompilable("a union of more than one non-null branch")
        index = others[0]
        branch = branches[index]
        resolved = self.named.get(branch, branch) if isinstance(branch, str) else branch
        if isinstance(resolved, dict) and resolved.get("type") in ("record", "error", "enum", "fixed"):
            raise NotCompilable("a union with a named type (fastavro validates the whole value to pick it)")
        if len(branches) == 2:
            code.emit(indent, f"if {expr} is None:")
            code.emit(indent + 1, f"out += {_long(1 - index)!r}")
            code.emit(indent, "else:")
            indent += 1
        code.emit(indent, f"out += {_long(index)!r}")
        # fastavro picks the branch by validating the value: require the exact Python type
        # the branch is written from, so a value fastavro might refuse goes to fastavro
        if isinstance(resolved, dict) and resolved.get("logicalType") is not None:
            want = {"decimal": "_Decimal", "timestamp-micros": "_datetime"}.get(resolved["logicalType"])
            if want is None:
                raise NotCompilable(f"a union with logical type {resolved['logicalType']}")
            code.emit(indent, f"if type({expr}) is not {want}:")
            code.emit(indent + 1, "raise TypeError('union branch')")
        self.write(code, branch, expr, indent, depth + 1)

    def logical(
        self, code: _Code, schema: dict[str, Any], key: str, prepare: Any, expr: str, indent: int, depth: int
    ) -> None:
        s = self.const(schema, "schema")
        p = self.const(prepare, "prepare")
        v = code.var()
        if key == "long-timestamp-micros":
            code.emit(indent, f"if type({expr}) is _datetime and {expr}.tzinfo is _UTC:")
            code.emit(indent + 1, f"{v} = ({expr} - _EPOCH) // _ONE_US")
            code.emit(indent, "else:")
            code.emit(indent + 1, f"{v} = _micros({expr}, {s}, {p})")
        else:
            code.emit(indent, f"{v} = {p}({expr}, {s})")
        base = {k: val for k, val in schema.items() if k not in ("logicalType", "__fastavro_parsed", "__named_schemas")}
        self.write(code, base if base.get("type") in ("fixed",) else base["type"], v, indent, depth + 1)


def compile_writer(
    schema: Any, *, attr_records: frozenset[str] | set[str] = frozenset(), prefix: bytes = b""
) -> Callable[[Any], bytes]:
    """`write(value) -> prefix + Avro binary of value` for `schema` (a fastavro-parsed schema).

    Records named in `attr_records` are read by attribute (dataclasses), others by key.
    Raises NotCompilable for what it does not handle; `write` raises on any value it does not
    take exactly as fastavro would (the caller then uses fastavro).
    """
    compiler = _Compiler(schema, frozenset(attr_records))
    code = _Code()
    compiler.write(code, schema, "value", 1)
    consts = compiler.consts
    consts["_prefix"] = bytes(prefix)
    names = sorted(consts)
    head = "def write(value, " + ", ".join(f"{n}={n}" for n in names) + "):"
    src = "\n".join([head, "    out = bytearray(_prefix)", *code.lines, "    return bytes(out)"]) + "\n"
    namespace = dict(consts)
    try:
        code_object = compile(src, f"<avro writer {_name(schema)}>", "exec")
    except (SyntaxError, RecursionError, MemoryError) as exc:  # nested deeper than Python compiles
        raise NotCompilable(f"generated code does not compile: {exc}") from None
    exec(code_object, namespace)  # our own generated code
    write: Callable[[Any], bytes] = namespace["write"]
    write.__avro_source__ = src  # type: ignore[attr-defined]
    return write


def _name(schema: Any) -> str:
    if isinstance(schema, dict):
        return str(schema.get("name", schema.get("type")))
    return str(schema)


def unchecked_twin(cls: type) -> type | None:
    """A subclass of frozen slotted dataclass `cls` whose instances take plain attribute stores;
    setting `__class__ = cls` afterwards yields exactly what `cls(**fields)` makes, 8-10x
    cheaper than the frozen `__init__` (the compiled decoder's construction trick, see
    `streams.avro_fast`). None when `cls` is not safe for it. For hot paths that build events
    (the ledger's entries): every field must be stored before the class is set."""
    return _twin(cls)
