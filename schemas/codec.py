"""Framed Avro: Confluent wire format (00, schema id, body) and single-object encoding (C3 01, fingerprint, body)."""

from __future__ import annotations

import io
import json
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import fastavro
from fastavro.schema import to_parsing_canonical_form

from schemas.errors import ConfigError, DecodeError
from schemas.records import ControlEvent, InferenceRequest, ModelInfo, Record, TokenEvent, from_avro, kind_of, to_avro
from schemas.varint import decode_uvarint

MAGIC = b"\xc3\x01"
HEADER_LEN = 10
CONFLUENT_MAGIC = 0
CONFLUENT_HEADER_LEN = 5
AVRO_DIR = Path(__file__).parent / "avro"
# The first byte of a value tells the framing apart, so one content type names both.
CONTENT_TYPE = "application/avro"

# Resolves a Confluent schema id to the writer schema's JSON text; raises DecodeError (or a retriable
# subclass when the registry cannot be reached). Supplied by services/, which owns the registry client.
SchemaResolver = Callable[[int], str]

_CRC64_EMPTY = 0xC15D213AA4D7A795


def _crc64_table() -> list[int]:
    table = []
    for i in range(256):
        fp = i
        for _ in range(8):
            fp = (fp >> 1) ^ (_CRC64_EMPTY & -(fp & 1))
        table.append(fp)
    return table


_CRC64_TABLE = _crc64_table()


def crc64_avro(data: bytes) -> int:
    """The Rabin CRC-64 the Avro specification names CRC-64-AVRO."""
    fp = _CRC64_EMPTY
    for byte in data:
        fp = (fp >> 8) ^ _CRC64_TABLE[(fp ^ byte) & 0xFF]
    return fp


def fingerprint(schema: dict[str, Any]) -> bytes:
    """8-byte little-endian CRC-64-AVRO of the schema's parsing canonical form."""
    canonical = to_parsing_canonical_form(schema)
    return struct.pack("<Q", crc64_avro(canonical.encode("utf-8")))


@dataclass(frozen=True, slots=True)
class _Version:
    name: str
    version: int
    schema: Any
    fingerprint: bytes
    raw: Mapping[str, Any]


class SchemaRegistry:
    """Every known writer schema, looked up by fingerprint; the newest version is the reader."""

    def __init__(self, schema_files: Iterable[Path]):
        self._by_fingerprint: dict[bytes, _Version] = {}
        self._newest: dict[str, _Version] = {}
        for path in sorted(schema_files):
            self.add(json.loads(path.read_text()), version=_version_of(path))

    def add(self, raw_schema: dict[str, Any], version: int) -> bytes:
        """Register one schema version; returns its fingerprint."""
        parsed = fastavro.parse_schema(raw_schema, _write_hint=False)
        name = raw_schema["name"]
        entry = _Version(name, version, parsed, fingerprint(raw_schema), raw_schema)
        self._by_fingerprint[entry.fingerprint] = entry
        current = self._newest.get(name)
        if current is None or current.version <= version:
            self._newest[name] = entry
        return entry.fingerprint

    def names(self) -> list[str]:
        """Record names (without namespace) of every known schema."""
        return sorted(self._newest)

    def schema_json(self, name: str) -> str:
        """The newest schema called ``name`` as JSON text, as it is registered in a schema registry."""
        return json.dumps(self.newest(name).raw, separators=(",", ":"))

    def newest(self, name: str) -> _Version:
        try:
            return self._newest[name]
        except KeyError:
            raise DecodeError(f"no schema named {name!r}") from None

    def writer(self, fp: bytes) -> _Version:
        entry = self._by_fingerprint.get(fp)
        if entry is None:
            raise DecodeError(f"unknown schema fingerprint {fp.hex()}")
        return entry


def _version_of(path: Path) -> int:
    # File names are <Name>.v<N>.avsc.
    stem = path.name.removesuffix(".avsc")
    _, _, tag = stem.rpartition(".v")
    return int(tag) if tag.isdigit() else 1


class Codec:
    """Encodes records with the newest schema and decodes either framing into typed records.

    With ``schema_ids`` (record name → id registered for that schema) values are written in the Confluent
    wire format; without, in Avro single-object encoding. Reading accepts both: ``00`` + id, resolved by the
    ids this codec registered or by ``resolve``; ``C3 01`` + fingerprint, resolved by the local schemas.
    """

    def __init__(
        self,
        registry: SchemaRegistry | None = None,
        *,
        schema_ids: Mapping[str, int] | None = None,
        resolve: SchemaResolver | None = None,
    ):
        self.registry = registry or default_registry()
        self.schema_ids = dict(schema_ids or {})
        self._resolve = resolve
        self._prefix: dict[str, bytes] = {}
        self._by_id: dict[int, _Version] = {}
        for name, schema_id in self.schema_ids.items():
            self._prefix[name] = struct.pack(">bI", CONFLUENT_MAGIC, schema_id)
            self._by_id[schema_id] = self.registry.newest(name)

    @property
    def framing(self) -> str:
        """``confluent`` when this codec writes registry ids, else ``single-object``."""
        return "confluent" if self.schema_ids else "single-object"

    def encode(self, record: Record) -> bytes:
        return self.encode_dict(kind_of(record), to_avro(record))

    def encode_dict(self, name: str, data: dict[str, Any]) -> bytes:
        """Encode a plain dict with the newest schema called ``name``."""
        entry = self.registry.newest(name)
        buf = io.BytesIO()
        if self.schema_ids:
            prefix = self._prefix.get(name)
            if prefix is None:
                raise ConfigError(f"no schema id for {name}: its subject was not registered at start")
            buf.write(prefix)
        else:
            buf.write(MAGIC)
            buf.write(entry.fingerprint)
        fastavro.schemaless_writer(buf, entry.schema, data)
        return buf.getvalue()

    def decode_dict(self, data: bytes, expect: str | None = None) -> tuple[str, dict[str, Any]]:
        """Decode framed bytes into (record name, dict) with the newest reader schema."""
        if not isinstance(data, bytes | bytearray | memoryview):
            raise DecodeError(f"expected bytes, got {type(data).__name__}")
        if len(data) >= CONFLUENT_HEADER_LEN and data[0] == CONFLUENT_MAGIC:
            (schema_id,) = struct.unpack_from(">I", data, 1)
            writer = self._by_id.get(schema_id) or self._writer_by_id(schema_id)
            header = CONFLUENT_HEADER_LEN
        elif len(data) >= HEADER_LEN and data[:2] == MAGIC:
            writer = self.registry.writer(bytes(data[2:HEADER_LEN]))
            header = HEADER_LEN
        else:
            raise DecodeError("not a framed Avro record (neither 00 + schema id nor C3 01 + fingerprint)")
        if expect is not None and writer.name != expect:
            raise DecodeError(f"expected a {expect} record, got {writer.name}")
        reader = self.registry.newest(writer.name)
        buf = io.BytesIO(data)
        buf.seek(header)
        try:
            value = fastavro.schemaless_reader(
                buf,
                writer.schema,
                reader.schema if reader is not writer else None,
                return_record_name=True,
                return_record_name_override=True,
            )
        except Exception as exc:  # fastavro raises many types on corrupt bodies
            raise DecodeError(f"corrupt {writer.name} body: {exc}") from exc
        if buf.tell() != len(data):
            raise DecodeError(f"{len(data) - buf.tell()} trailing bytes after the {writer.name} body")
        if not isinstance(value, dict):
            raise DecodeError(f"{writer.name} body is not a record")
        return writer.name, value

    def _writer_by_id(self, schema_id: int) -> _Version:
        """A writer schema this codec did not register (another producer's version), fetched once and kept."""
        if self._resolve is None:
            raise DecodeError(f"schema id {schema_id}: no schema registry configured to resolve it")
        text = self._resolve(schema_id)
        try:
            raw = json.loads(text)
            name = raw["name"].rpartition(".")[2] if isinstance(raw, dict) else ""
            parsed = fastavro.parse_schema(raw, _write_hint=False)
            fp = fingerprint(raw)
        except Exception as exc:  # JSON and fastavro errors on a schema that is not an Avro record
            raise DecodeError(f"schema id {schema_id} is not a usable Avro schema: {exc}") from exc
        if name not in self.registry.names():
            raise DecodeError(f"schema id {schema_id} is a {raw.get('name')!r} record, not one of tokenrelay's")
        entry = _Version(name, -1, parsed, fp, raw)
        self._by_id[schema_id] = entry
        return entry

    def decode(self, data: bytes, expect: str | None = None) -> Record:
        name, value = self.decode_dict(data, expect)
        try:
            return from_avro(name, value)
        except (KeyError, TypeError, ValueError) as exc:
            raise DecodeError(f"{name} does not fit the typed record: {exc}") from exc

    def decode_request(self, data: bytes) -> InferenceRequest:
        record = self.decode(data, "InferenceRequest")
        assert isinstance(record, InferenceRequest)
        return record

    def decode_event(self, data: bytes) -> TokenEvent:
        record = self.decode(data, "TokenEvent")
        assert isinstance(record, TokenEvent)
        return record

    def decode_control(self, data: bytes) -> ControlEvent:
        record = self.decode(data, "ControlEvent")
        assert isinstance(record, ControlEvent)
        return record

    def decode_model_info(self, data: bytes) -> ModelInfo:
        record = self.decode(data, "ModelInfo")
        assert isinstance(record, ModelInfo)
        return record


@dataclass(frozen=True, slots=True)
class EventHead:
    """What the first bytes of a TokenEvent value say: whether its run id is empty (an Accepted, or an end a gateway
    wrote) and which payload it carries (its branch of the payload union, e.g. ``DELTA_BRANCH``)."""

    run_empty: bool
    branch: int


def run_id_empty(value: bytes, key: bytes) -> bool:
    """``peek_event(value).run_empty`` for a value keyed by its request id, faster: the relay's tap asks it of every
    record of its partitions (two bytes compared, no copy, for ids shorter than 64 bytes)."""
    if not value:
        return False
    if value[0] == CONFLUENT_MAGIC:
        start = CONFLUENT_HEADER_LEN
    elif value[0] == MAGIC[0] and value[1:2] == MAGIC[1:]:
        start = HEADER_LEN
    else:
        return False
    n = len(key)
    if n >= 64:
        head = peek_event(value)
        return head is not None and head.run_empty
    end = start + 1 + n
    return len(value) > end and value[start] == 2 * n and value[end] == 0


# Every TokenEvent version keeps the payload union's order (Started, Delta, Finished, Failed, Accepted).
DELTA_BRANCH = 1


def peek_event(value: bytes) -> EventHead | None:
    """The head of a TokenEvent value read without decoding it (a reader of every event picks the few it needs
    cheaply); None for bytes of another framing, or too short.

    TokenEvent's body begins ``request_id``, ``run_id`` (Avro strings: zigzag length, bytes), ``seq``, ``ts_ms``
    (zigzag longs), then the payload's union branch.
    """
    if value[:1] == b"\x00":
        pos = CONFLUENT_HEADER_LEN
    elif value[:2] == MAGIC:
        pos = HEADER_LEN
    else:
        return None
    run_empty = False
    for field in range(4):
        read = decode_uvarint(value, pos)
        if read is None:
            return None
        number, pos = read
        if field < 2:
            pos += number >> 1  # a string's length (zigzag of a length is twice it)
        if field == 1:
            run_empty = number == 0
    branch = decode_uvarint(value, pos)
    if branch is None:
        return None
    return EventHead(run_empty, branch[0] >> 1)


@cache
def default_registry() -> SchemaRegistry:
    """Registry of every `.avsc` shipped in `schemas/avro`."""
    return SchemaRegistry(AVRO_DIR.glob("*.avsc"))


@cache
def default_codec() -> Codec:
    """A codec without a registry: writes single-object encoding, reads single-object and nothing else."""
    return Codec(default_registry())
