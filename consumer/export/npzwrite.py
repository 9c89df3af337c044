"""Atomic, streaming ``.npz`` writing: temp file beside the output, fsync, validate, replace.

Also owns the names of what a writer leaves beside its output (temp file, scratch
directory, lock file) and ``cleanup_stale_temp_files`` for a daemon after a crash.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import zipfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import numpy as np
from msgspec import Struct

from consumer.locks import try_lock

# ".<output name>.<random hex>.tmp.npz": hidden, in the output's directory (same
# filesystem, so os.replace is atomic), and ending in .npz so numpy never renames it.
TEMP_SUFFIX = ".tmp.npz"
TEMP_PATTERN = ".{name}.*" + TEMP_SUFFIX
# Scratch segments of an export without the cache: ".<output name>.<random hex>.work/".
WORK_SUFFIX = ".work"
WORK_PATTERN = ".{name}.*" + WORK_SUFFIX
LOCK_PATTERN = ".{name}.lock"

Progress = Callable[[str, int, int], None]  # (stage, done, total)


class OutputBusy(Exception):
    """Another process holds the output's lock."""


class InvalidOutput(Exception):
    """A written file does not read back as the arrays that were written."""


class Member(Struct, frozen=True):
    """One array of the archive, produced as raw C-order bytes block by block."""

    name: str
    dtype: str  # numpy descr, e.g. "<f4"
    shape: tuple[int, ...]
    blocks: Callable[[], Iterable[bytes]]

    @property
    def nbytes(self) -> int:
        count = 1
        for n in self.shape:
            count *= n
        return count * np.dtype(self.dtype).itemsize


def member(name: str, array: np.ndarray) -> Member:
    """A member for an array already in memory (small: metadata, game ids)."""
    data = np.asarray(array, order="C")
    return Member(name, data.dtype.str, data.shape, lambda: [data.tobytes()])


class Written(Struct, frozen=True):
    path: str
    bytes: int
    sha256: str


def temp_path(output: Path) -> Path:
    name = TEMP_PATTERN.format(name=output.name).replace("*", secrets.token_hex(6))
    return output.with_name(name)


def work_dir(output: Path) -> Path:
    name = WORK_PATTERN.format(name=output.name).replace("*", secrets.token_hex(6))
    return output.with_name(name)


@contextmanager
def output_lock(output: Path) -> Iterator[None]:
    """Hold the output's lock file (one writer per output); raise OutputBusy if held."""
    lock = try_lock(output.with_name(LOCK_PATTERN.format(name=output.name)))
    if lock is None:
        raise OutputBusy(f"another export is writing {output}")
    with lock:
        yield


def cleanup_stale_temp_files(output_path: str | Path) -> list[Path]:
    """Delete temp files and scratch directories a killed export left beside
    ``output_path``; returns them. Does nothing while a live export holds the lock."""
    output = Path(output_path).absolute()
    if not output.parent.is_dir():
        return []
    try:
        with output_lock(output):
            stale = sorted(output.parent.glob(TEMP_PATTERN.format(name=output.name)))
            stale += sorted(output.parent.glob(WORK_PATTERN.format(name=output.name)))
            for path in stale:
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
            return stale
    except OutputBusy:
        return []


class _HashingSink:
    """A write-only, unseekable file: zipfile then streams each member with a data
    descriptor, so the archive's sha256 is known when the last byte is written."""

    def __init__(self, raw: Callable[[bytes], object]) -> None:
        self._raw = raw
        self._hash = hashlib.sha256()
        self._position = 0

    def write(self, data: bytes) -> int:
        self._hash.update(data)
        self._raw(data)
        size = memoryview(data).nbytes
        self._position += size
        return size

    def tell(self) -> int:
        return self._position

    def flush(self) -> None:
        pass

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def _header(m: Member) -> dict[str, object]:
    return {"descr": m.dtype, "fortran_order": False, "shape": m.shape}


def write_npz_atomic(output: Path, members: list[Member], progress: Progress) -> Written:
    """Write ``members`` to ``output`` atomically; the previous file survives any failure."""
    tmp = temp_path(output)
    total = sum(m.nbytes for m in members)
    done = 0
    progress("write", done, total)
    try:
        with open(tmp, "xb") as raw:
            sink = _HashingSink(raw.write)
            with zipfile.ZipFile(sink, "w", compression=zipfile.ZIP_STORED) as archive:  # type: ignore[arg-type]
                for m in members:
                    with archive.open(f"{m.name}.npy", "w", force_zip64=True) as f:
                        np.lib.format.write_array_header_1_0(f, _header(m))
                        written = 0
                        for block in m.blocks():
                            f.write(block)
                            written += len(block)
                            done += len(block)
                            progress("write", done, total)
                        if written != m.nbytes:
                            raise InvalidOutput(f"{m.name}: wrote {written} of {m.nbytes} bytes")
            raw.flush()
            os.fsync(raw.fileno())
            size = raw.tell()
        validate_npz(tmp, members)
        os.replace(tmp, output)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(output.parent)
    return Written(path=str(output), bytes=size, sha256=sink.hexdigest())


def validate_npz(path: Path, members: list[Member]) -> dict[str, object]:
    """Check that ``path`` holds exactly ``members`` (names, dtypes, shapes, sizes), loads
    with ``allow_pickle=False``, and that its CSR pointers span the policy entries; reads
    headers and a few bytes, not the arrays. Returns the decoded metadata."""
    expected = {f"{m.name}.npy": m for m in members}
    try:
        with zipfile.ZipFile(path) as archive:
            if sorted(archive.namelist()) != sorted(expected):
                raise InvalidOutput(f"{path}: members {archive.namelist()}")
            for info in archive.infolist():
                m = expected[info.filename]
                with archive.open(info) as f:
                    header = _read_header(f)
                    data_start = f.tell()
                    if m.name == "policy_indptr":
                        entries = expected["policy_indices.npy"].shape[0]
                        first = np.frombuffer(f.read(8), dtype="<i8")
                        f.seek(info.file_size - 8)
                        last = np.frombuffer(f.read(8), dtype="<i8")
                        if first.tolist() != [0] or last.tolist() != [entries]:
                            raise InvalidOutput(f"{path}: policy_indptr does not span entries")
                if header != (m.shape, False, np.dtype(m.dtype)):
                    raise InvalidOutput(f"{path}: {m.name} is {header}")
                if info.file_size != data_start + m.nbytes:
                    raise InvalidOutput(f"{path}: {m.name} has {info.file_size} bytes")
        with np.load(path, allow_pickle=False) as data:
            metadata = json.loads(str(data["metadata"]))
    except (zipfile.BadZipFile, KeyError, ValueError, OSError, EOFError) as exc:
        raise InvalidOutput(f"{path}: {exc}") from exc
    return metadata


def _read_header(f: BinaryIO) -> tuple[tuple[int, ...], bool, np.dtype]:
    if np.lib.format.read_magic(f) != (1, 0):
        raise InvalidOutput("not a version 1.0 .npy header")
    return np.lib.format.read_array_header_1_0(f)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
