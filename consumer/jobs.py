"""Run the export job: build its argv, run it in its own process group with a timeout, and
parse and validate the one JSON result line it prints. Deciding when to run it is not here.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import os
import signal
import stat
import string
import time
import zipfile
import zlib
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Annotated

import msgspec
import numpy as np
from msgspec import Meta

log = logging.getLogger(__name__)

STDERR_TAIL_BYTES = 4096
MAX_RESULT_LINE_BYTES = 64 * 1024
HASH_CHUNK_BYTES = 1024 * 1024

_HEADER_READERS = {
    (1, 0): np.lib.format.read_array_header_1_0,
    (2, 0): np.lib.format.read_array_header_2_0,
}


class ExportOutput(msgspec.Struct, frozen=True, kw_only=True):
    """The job contract: its last non-empty stdout line is this object; unknown fields ignored."""

    output_path: str  # must be absolute; checked by validate_output
    samples: Annotated[int, Meta(ge=0)]
    games: Annotated[int, Meta(ge=0)]


class ValidatedOutput(msgspec.Struct, frozen=True, kw_only=True):
    """An ExportOutput whose file loads without pickle, with what a trainer needs to trust it."""

    output_path: str
    samples: int
    games: int
    size_bytes: int
    sha256: str


class JobResult(msgspec.Struct, frozen=True, kw_only=True):
    exit_code: int | None  # None when killed at the timeout or never started
    timed_out: bool
    duration_s: float
    result: ValidatedOutput | None  # set exactly when the job succeeded
    error: str | None  # one line, set exactly when it failed
    stderr_tail: str


class OutputInvalid(Exception):
    """The job's result line or the file it names cannot be trusted; the message says why."""


_output_decoder = msgspec.json.Decoder(ExportOutput)


def _placeholders(text: str) -> Iterator[str]:
    for _, name, spec, _ in string.Formatter().parse(text):
        if name is not None:
            yield name
            if spec:  # "{a:{b}}" formats b too
                yield from _placeholders(spec)


def check_template(template: Sequence[str], allowed_fields: Iterable[str]) -> None:
    """Raise ValueError naming the first placeholder outside ``allowed_fields``."""
    if not template:
        raise ValueError("export command is empty")
    allowed = set(allowed_fields)
    for element in template:
        try:
            names = list(_placeholders(element))
        except ValueError as exc:
            raise ValueError(f"export command element {element!r} is malformed: {exc}") from None
        for name in names:
            # Exact names only: "{config.__class__}" or "{0}" would reach past the fields.
            if name not in allowed:
                raise ValueError(
                    f"unknown placeholder {{{name}}} in export command element {element!r}"
                    f" (known: {', '.join(sorted(allowed))})"
                )


def build_argv(template: Sequence[str], fields: Mapping[str, object]) -> list[str]:
    check_template(template, fields)
    return [element.format_map(fields) for element in template]


class _LastLine:
    """The last non-empty line of a stream, keeping at most ``limit`` bytes of it."""

    def __init__(self, limit: int) -> None:
        self.line = b""
        self.too_long = False
        self._limit = limit
        self._partial = bytearray()
        self._overflow = False

    def feed(self, chunk: bytes) -> None:
        end = chunk.rfind(b"\n")
        if end < 0:
            self._extend(chunk)
            return
        # Only the last non-empty complete line in the chunk matters: no per-line loop.
        body = chunk[:end].rstrip()
        start = body.rfind(b"\n") + 1
        if start > 0:  # a later line supersedes the partial one
            self._partial.clear()
            self._overflow = False
        self._extend(body[start:])
        self._end_line()
        self._extend(chunk[end + 1 :])

    def close(self) -> None:
        self._end_line()

    def _extend(self, data: bytes) -> None:
        if self._overflow:
            return
        if not self._partial:  # so a long blank line is never "too long"
            data = data.lstrip()
        if len(self._partial) + len(data) > self._limit:
            self._overflow = True
            self._partial.clear()
        else:
            self._partial += data

    def _end_line(self) -> None:
        if self._overflow:
            self.line, self.too_long = b"", True
        elif stripped := bytes(self._partial).strip():
            self.line, self.too_long = stripped, False
        self._partial.clear()
        self._overflow = False


class _Tail:
    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._data = bytearray()

    def feed(self, chunk: bytes) -> None:
        self._data += chunk[-self._limit :]
        del self._data[: -self._limit]

    def text(self) -> str:
        return self._data.decode("utf-8", errors="replace")


class _JobProtocol(asyncio.SubprocessProtocol):
    """Keeps bounded output; ``exited`` resolves once the leader is reaped, whoever holds
    the pipes (``Process.wait()`` on 3.11 also waits for the pipes, which orphans hold).
    """

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.last_line = _LastLine(MAX_RESULT_LINE_BYTES)
        self.stderr = _Tail(STDERR_TAIL_BYTES)
        self.exited: asyncio.Future[None] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()  # exited and pipes closed

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        if fd == 1:
            self.last_line.feed(data)
        else:
            self.stderr.feed(data)

    def process_exited(self) -> None:
        self.exited.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed.set_result(None)


def _signal_group(pgid: int, sig: signal.Signals) -> bool:
    """Signal the job's process group; False when nothing is left in it."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    return True


async def _stop_group(pgid: int, exited: asyncio.Future[None], grace_s: float) -> None:
    """SIGTERM the group, give the leader ``grace_s`` to exit, SIGKILL the group, reap."""
    exited_alone = exited.done()
    try:
        if not exited_alone:
            _signal_group(pgid, signal.SIGTERM)
            # asyncio.wait never cancels `exited`, even when this task is cancelled.
            await asyncio.wait([exited], timeout=grace_s)
    finally:
        # Also when cancelled again during the grace. The leader owns its children: whatever
        # outlives it is killed, never left running (failures-from-the-field 17).
        if _signal_group(pgid, signal.SIGKILL) and exited_alone:
            log.warning("export job %d exited leaving processes in its group; killed", pgid)
    await asyncio.wait([exited])


async def run_job(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None,
    timeout_s: float,
    cwd: str | None = None,
    term_grace_s: float = 5.0,
    on_start: Callable[[int], Awaitable[None]] | None = None,
) -> JobResult:
    """Run one export job to completion, timeout or cancellation; never leaves its group behind.

    ``env`` is passed as is (None inherits ours). On cancellation the group is stopped the
    same way as on timeout and CancelledError propagates. ``on_start(pgid)`` runs once the
    group exists, so a caller can persist it and stop it after a crash of its own.
    """
    started = time.monotonic()
    loop = asyncio.get_running_loop()
    try:
        transport, protocol = await loop.subprocess_exec(
            _JobProtocol,
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )
    except OSError as exc:
        return JobResult(
            exit_code=None,
            timed_out=False,
            duration_s=time.monotonic() - started,
            result=None,
            error=f"cannot start {argv[0]!r}: {exc}",
            stderr_tail="",
        )
    pgid = transport.get_pid()  # start_new_session: the leader's pid is the group id
    try:
        try:
            if on_start is not None:
                await on_start(pgid)
            done, _ = await asyncio.wait([protocol.exited], timeout=timeout_s)
            timed_out = not done
        finally:
            await _stop_group(pgid, protocol.exited, term_grace_s)
        # With the group gone the pipes close, unless a process that left the group holds them.
        done, _ = await asyncio.wait([protocol.closed], timeout=term_grace_s)
        if not done:
            log.warning("export job %d: a process outside its group holds its output", pgid)
    finally:
        transport.close()
    duration_s = time.monotonic() - started  # the job's own time, without validation
    protocol.last_line.close()
    stderr_text = protocol.stderr.text()
    returncode = transport.get_returncode()

    result: ValidatedOutput | None = None
    error: str | None = None
    if timed_out:
        error = f"timed out after {timeout_s:g} s{_stderr_suffix(stderr_text)}"
    elif returncode != 0:
        error = f"{_describe_exit(returncode)}{_stderr_suffix(stderr_text)}"
    else:
        try:
            result = await validate_output(_parse_result(protocol.last_line))
        except OutputInvalid as exc:
            error = f"exit code 0 but {exc}"
    return JobResult(
        exit_code=None if timed_out else returncode,
        timed_out=timed_out,
        duration_s=duration_s,
        result=result,
        error=error,
        stderr_tail=stderr_text,
    )


def _describe_exit(returncode: int | None) -> str:
    if returncode is not None and returncode < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-returncode).name}"
    return f"exit code {returncode}"


def _stderr_suffix(stderr_text: str, limit: int = 500) -> str:
    lines = [line.strip() for line in stderr_text.splitlines() if line.strip()]
    return f": {lines[-1][:limit]}" if lines else " (no stderr)"


def _parse_result(last_line: _LastLine) -> ExportOutput:
    if last_line.too_long:
        raise OutputInvalid(f"the last stdout line is longer than {MAX_RESULT_LINE_BYTES} bytes")
    if not last_line.line:
        raise OutputInvalid("no result line on stdout")
    try:
        return _output_decoder.decode(last_line.line)
    except msgspec.DecodeError as exc:  # ValidationError included; its text names the field
        shown = last_line.line[:200].decode("utf-8", errors="replace")
        raise OutputInvalid(
            f"the last stdout line is not a valid result ({exc}): {shown!r}"
        ) from None


async def validate_output(output: ExportOutput) -> ValidatedOutput:
    """Check the file the job names is a loadable ``.npz`` (no pickle); size and sha256 it."""
    return await asyncio.to_thread(_validate_output, output)


def _validate_output(output: ExportOutput) -> ValidatedOutput:
    path = output.output_path
    if not os.path.isabs(path):
        raise OutputInvalid(f"output_path {path!r} is not absolute")
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise OutputInvalid(f"output_path {path} does not exist") from None
    except OSError as exc:
        raise OutputInvalid(f"cannot stat output_path {path}: {exc.strerror}") from None
    if not stat.S_ISREG(mode):
        raise OutputInvalid(f"output_path {path} is not a regular file")
    if not path.endswith(".npz"):
        raise OutputInvalid(f"output_path {path} does not end with .npz")
    digest = hashlib.sha256()
    size_bytes = 0
    try:
        # One open file for every check, so a concurrent replace cannot mix two files.
        with open(path, "rb") as fh:
            _check_npz(fh, path)
            fh.seek(0)
            while chunk := fh.read(HASH_CHUNK_BYTES):
                digest.update(chunk)
                size_bytes += len(chunk)
    except OSError as exc:
        raise OutputInvalid(f"cannot read output_path {path}: {exc.strerror}") from None
    return ValidatedOutput(
        output_path=path,
        samples=output.samples,
        games=output.games,
        size_bytes=size_bytes,
        sha256=digest.hexdigest(),
    )


def _check_npz(fh: IO[bytes], path: str) -> None:
    try:
        with zipfile.ZipFile(fh) as archive:
            members = archive.infolist()
            if not members:
                raise OutputInvalid(f"{path} holds no arrays")
            for info in members:
                _check_member(archive, info)
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
        raise OutputInvalid(f"{path} is not a valid zip: {exc}") from None


def _check_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> None:
    name = info.filename
    if not name.endswith(".npy"):
        raise OutputInvalid(f"member {name!r} is not a .npy array")
    with archive.open(info) as member:
        try:
            version = np.lib.format.read_magic(member)
            read_header = _HEADER_READERS.get(version)
            if read_header is None:
                raise OutputInvalid(f"member {name!r} has unsupported .npy version {version}")
            shape, _, dtype = read_header(member)
        except ValueError as exc:
            raise OutputInvalid(f"member {name!r} has no readable .npy header: {exc}") from None
        if dtype.hasobject:
            raise OutputInvalid(f"member {name!r} is an object array; it needs pickle to load")
        expected = math.prod(shape) * dtype.itemsize
        # Reading to the end also makes zipfile verify the member's CRC.
        data_bytes = 0
        while chunk := member.read(HASH_CHUNK_BYTES):
            data_bytes += len(chunk)
    if data_bytes != expected:
        raise OutputInvalid(
            f"member {name!r} holds {data_bytes} data bytes, its header says {expected}"
        )


def process_identity(pid: int) -> str | None:
    """Boot id and start time of a process (Linux), or None: a pid alone may be reused."""
    try:
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        proc_stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 22 (starttime) counts from the end of the parenthesised command name.
    return f"{boot_id}:{proc_stat.rsplit(')', 1)[1].split()[19]}"


def kill_stale_group(pgid: int, identity: str | None) -> bool:
    """SIGKILL the process group of a job a previous daemon started, if its leader is still
    that very process; never signal a group whose identity cannot be confirmed."""
    if identity is None or process_identity(pgid) != identity:
        return False
    return _signal_group(pgid, signal.SIGKILL)
