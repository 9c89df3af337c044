"""Encoded games on disk: segment files and the manifest that makes them a cache.

A segment holds the games one export run encoded from one store, as chunks of raw arrays
with a CRC32 per part. A manifest that does not decode, names a missing or short file, or
was made for other options is discarded; a CRC mismatch raises ``CacheCorrupt`` on read.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import uuid
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import msgspec
import numpy as np
from msgspec import Struct

from consumer.export.encode import Encoded

CACHE_FORMAT = 2
_MANIFEST = "manifest.json"
_SEGMENT_SUFFIX = ".seg"


class CacheCorrupt(Exception):
    """A cached part does not match its checksum."""


class Part(Struct, frozen=True, array_like=True):
    offset: int
    nbytes: int
    crc32: int


class Chunk(Struct, frozen=True):
    samples: int
    entries: int  # policy entries
    games: int
    parts: dict[str, Part]


class Segment(Struct, frozen=True):
    file: str
    store_path: str
    store_id: str
    games: int
    samples: int
    entries: int
    game_ids: Part  # newline-separated UTF-8
    chunks: list[Chunk]
    skipped: dict[str, str]  # game id -> reason, for games rejected while encoding
    bad_policy_moves: int


class StoreMark(Struct, frozen=True, kw_only=True):
    """How far a store was read: every game up to ``rowid`` is in its segments or counted
    as skipped, except the ``pending`` ones (in progress) and the ``duplicates``."""

    store_id: str
    rowid: int
    rows: int  # games with a rowid up to ``rowid``
    id_hex: str | None  # hex of the game id at ``rowid``: a reused rowid shows
    pending: list[int]  # rowids of games in progress
    duplicates: list[str]  # ids taken from an earlier store
    skipped: dict[str, int]  # the other games rejected before encoding, by reason


class Manifest(Struct):
    cache_format: int
    key: dict[str, Any]
    segments: list[Segment]
    marks: dict[str, StoreMark]  # by store path


def cache_key(fields: dict[str, Any]) -> str:
    text = json.dumps({"cache_format": CACHE_FORMAT, **fields}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def read_part(f: BinaryIO, part: Part, verify: bool = True) -> bytes:
    f.seek(part.offset)
    data = f.read(part.nbytes)
    if len(data) != part.nbytes or (verify and zlib.crc32(data) != part.crc32):
        raise CacheCorrupt(f"{getattr(f, 'name', f)}: part at {part.offset} fails its checksum")
    return data


class SegmentWriter:
    """Appends encoded batches of one store to a new segment file."""

    def __init__(self, directory: Path, store_path: str, store_id: str, *, fsync: bool) -> None:
        self._directory = directory
        self._fsync = fsync
        self._name = f"{uuid.uuid4().hex}{_SEGMENT_SUFFIX}"
        self._file = open(directory / self._name, "xb")  # noqa: SIM115 - closed in finish/discard
        self._store = (store_path, store_id)
        self._chunks: list[Chunk] = []
        self.game_ids: list[str] = []
        self._skipped: dict[str, str] = {}
        self._bad_policy_moves = 0

    def _write(self, data: bytes | memoryview) -> Part:
        offset = self._file.tell()
        self._file.write(data)
        return Part(offset, len(data), zlib.crc32(data))

    def append(self, batch: Encoded) -> None:
        self._skipped |= batch.skipped
        self._bad_policy_moves += batch.bad_policy_moves
        if not batch.kept:
            return
        arrays = dict(batch.arrays)
        arrays["game_index"] = arrays["game_index"] + len(self.game_ids)
        parts = {name: self._write(memoryview(a).cast("B")) for name, a in arrays.items()}
        self._chunks.append(
            Chunk(
                samples=len(arrays["values"]),
                entries=len(arrays["policy_indices"]),
                games=len(batch.kept),
                parts=parts,
            )
        )
        self.game_ids.extend(batch.kept)

    def finish(self) -> Segment:
        ids = self._write("\n".join(self.game_ids).encode())
        self._file.flush()
        if self._fsync:
            os.fsync(self._file.fileno())
        self._file.close()
        return Segment(
            file=self._name,
            store_path=self._store[0],
            store_id=self._store[1],
            games=len(self.game_ids),
            samples=sum(c.samples for c in self._chunks),
            entries=sum(c.entries for c in self._chunks),
            game_ids=ids,
            chunks=self._chunks,
            skipped=self._skipped,
            bad_policy_moves=self._bad_policy_moves,
        )

    def discard(self) -> None:
        self._file.close()
        (self._directory / self._name).unlink(missing_ok=True)


@contextmanager
def cache_lock(directory: Path) -> Iterator[None]:
    """Serialize exports sharing one cache directory (e.g. two outputs of one config)."""
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _segment_intact(directory: Path, segment: Segment) -> bool:
    parts = [segment.game_ids, *(p for c in segment.chunks for p in c.parts.values())]
    end = max(p.offset + p.nbytes for p in parts)
    try:
        return (directory / segment.file).stat().st_size >= end
    except OSError:
        return False


class Workspace:
    """The segments of one export: a persistent cache directory, or a scratch directory
    that the caller deletes. Only a persistent one fsyncs segments and checks their CRCs
    on read: a scratch directory holds what this run just wrote."""

    def __init__(
        self,
        directory: Path,
        key: dict[str, Any],
        segments: list[Segment],
        marks: dict[str, StoreMark],
        *,
        persistent: bool = True,
    ) -> None:
        self.directory = directory
        self.key = key
        self.segments = segments
        self.marks = marks
        self.persistent = persistent

    @classmethod
    def open(cls, directory: Path, key: dict[str, Any]) -> Workspace:
        """Load the manifest in ``directory``; anything stale or damaged is dropped."""
        directory.mkdir(parents=True, exist_ok=True)
        try:
            manifest = msgspec.json.decode((directory / _MANIFEST).read_bytes(), type=Manifest)
        except (OSError, msgspec.DecodeError):
            manifest = None
        if manifest is None or manifest.cache_format != CACHE_FORMAT or manifest.key != key:
            segments, marks = [], {}
        else:
            broken = {s.store_path for s in manifest.segments if not _segment_intact(directory, s)}
            segments = [s for s in manifest.segments if s.store_path not in broken]
            marks = {p: m for p, m in manifest.marks.items() if p not in broken}
        workspace = cls(directory, key, segments, marks)
        workspace.remove_unlisted()
        return workspace

    def game_ids(self, segment: Segment) -> list[str]:
        with open(self.directory / segment.file, "rb") as f:
            data = read_part(f, segment.game_ids, self.persistent)
        return data.decode().split("\n") if data else []

    def blocks(self, segments: list[Segment], name: str) -> Iterator[bytes]:
        """The raw bytes of one array across ``segments``, chunk by chunk."""
        for segment in segments:
            with open(self.directory / segment.file, "rb") as f:
                for chunk in segment.chunks:
                    yield read_part(f, chunk.parts[name], self.persistent)

    def indptr_blocks(self, segments: list[Segment]) -> Iterator[bytes]:
        """CSR row pointers (int64, one more than samples) from the policy row lengths."""
        offset = 0
        yield np.zeros(1, dtype="<i8").tobytes()
        for data in self.blocks(segments, "policy_counts"):
            ends = np.cumsum(np.frombuffer(data, dtype="<i4"), dtype="<i8") + offset
            if len(ends):
                offset = int(ends[-1])
            yield ends.tobytes()

    def game_index_blocks(self, segments: list[Segment]) -> Iterator[bytes]:
        """Each sample's index into the exported game list (segment-local ids shifted)."""
        base = 0
        for segment in segments:
            for data in self.blocks([segment], "game_index"):
                yield (np.frombuffer(data, dtype="<i4") + np.int32(base)).astype("<i4").tobytes()
            base += segment.games

    def for_store(self, store_path: str) -> list[Segment]:
        return [s for s in self.segments if s.store_path == store_path]

    def drop(self, dropped: list[Segment]) -> None:
        self.segments = [s for s in self.segments if s not in dropped]

    def writer(self, store_path: str, store_id: str) -> SegmentWriter:
        return SegmentWriter(self.directory, store_path, store_id, fsync=self.persistent)

    def save(self) -> None:
        manifest = Manifest(
            cache_format=CACHE_FORMAT, key=self.key, segments=self.segments, marks=self.marks
        )
        tmp = self.directory / f".{_MANIFEST}.{uuid.uuid4().hex}.tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(msgspec.json.encode(manifest))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.directory / _MANIFEST)
        finally:
            tmp.unlink(missing_ok=True)
        self.remove_unlisted()

    def remove_unlisted(self) -> None:
        """Delete segment files the manifest does not name (left by a crash or a drop)."""
        listed = {s.file for s in self.segments}
        for path in self.directory.glob(f"*{_SEGMENT_SUFFIX}"):
            if path.name not in listed:
                path.unlink(missing_ok=True)

    def clear(self) -> None:
        """Forget every segment (the lock file stays: a waiting exporter holds it open)."""
        self.segments = []
        self.marks = {}
        (self.directory / _MANIFEST).unlink(missing_ok=True)
        self.remove_unlisted()
