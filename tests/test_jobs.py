"""consumer.jobs against tiny real job scripts run with this interpreter, and real .npz files."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import sys
import textwrap
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from consumer.jobs import (
    MAX_RESULT_LINE_BYTES,
    STDERR_TAIL_BYTES,
    ExportOutput,
    OutputInvalid,
    build_argv,
    check_template,
    run_job,
    validate_output,
)

TIMEOUT_S = 0.5
GRACE_S = 0.2


def job(tmp_path: Path, body: str, *args: str) -> list[str]:
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent(body))
    return [sys.executable, str(script), *args]


def write_npz(path: Path) -> Path:
    np.savez(path, states=np.arange(12, dtype=np.float32).reshape(3, 4), values=np.ones(3))
    return path


def is_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # A killed orphan stays a zombie until init reaps it, and it is dead all the same.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:  # reaped meanwhile (or no /proc): the next poll decides
        return False
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


async def wait_gone(pid: int, within_s: float = 5.0) -> bool:
    # Grandchildren are reparented to init, so poll instead of waiting on them.
    deadline = time.monotonic() + within_s
    while not is_gone(pid):
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


async def wait_for_pids(path: Path, count: int, within_s: float = 5.0) -> list[int]:
    deadline = time.monotonic() + within_s
    while len(lines := path.read_text().split() if path.exists() else []) < count:
        assert time.monotonic() < deadline, f"job did not write {count} pids to {path}"
        await asyncio.sleep(0.01)
    return [int(line) for line in lines]


# A job that records its pid and a hanging child's pid, one per line, then hangs itself.
HANG_WITH_CHILD = """
    import os, subprocess, sys, time
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1000)"])
    with open(sys.argv[1], "w") as f:
        f.write(f"{os.getpid()}\\n{child.pid}\\n")
    time.sleep(1000)
"""


async def test_success_after_lots_of_output(tmp_path: Path) -> None:
    npz = write_npz(tmp_path / "out.npz")
    argv = job(
        tmp_path,
        """
        import json, sys
        for i in range(50_000):
            print(f"progress {i}")
            print(f"warning {i}", file=sys.stderr)
        print(json.dumps({"output_path": sys.argv[1], "samples": 3, "games": 1, "extra": [1]}))
        """,
        str(npz),
    )
    outcome = await run_job(argv, env=None, timeout_s=30)
    assert outcome.error is None
    assert outcome.exit_code == 0
    assert not outcome.timed_out
    assert outcome.result is not None
    assert (outcome.result.output_path, outcome.result.samples, outcome.result.games) == (
        str(npz),
        3,
        1,
    )
    assert outcome.result.sha256 == hashlib.sha256(npz.read_bytes()).hexdigest()
    assert len(outcome.stderr_tail.encode()) <= STDERR_TAIL_BYTES
    assert outcome.stderr_tail.endswith("warning 49999\n")


@pytest.mark.parametrize(
    "writes",
    [
        ['progress 1\n{"output_path": ', 'PATH, "samples": 3, "games": 1}\n\n  \n'],
        ['{"output_path": PATH, ', '"samples": 3, ', '"games": 1}'],
    ],
    ids=["trailing-blank-lines", "no-final-newline"],
)
async def test_result_line_split_across_writes(tmp_path: Path, writes: list[str]) -> None:
    npz = write_npz(tmp_path / "out.npz")
    pieces = [piece.replace("PATH", json.dumps(str(npz))) for piece in writes]
    body = f"""
        import sys, time
        for piece in {pieces!r}:
            sys.stdout.write(piece)
            sys.stdout.flush()
            time.sleep(0.02)
    """
    outcome = await run_job(job(tmp_path, body), env=None, timeout_s=10)
    assert outcome.error is None
    assert outcome.result is not None
    assert outcome.result.samples == 3


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ("pass", "no result line on stdout"),
        ("print('done')\nprint()", "not a valid result (JSON is malformed"),
        ("print('[1, 2]')", "Expected `object`, got `array`"),
        ("print('x' * 100_000)", f"longer than {MAX_RESULT_LINE_BYTES} bytes"),
    ],
)
async def test_exit_0_without_a_result_line_fails(tmp_path: Path, body: str, reason: str) -> None:
    outcome = await run_job(job(tmp_path, body), env=None, timeout_s=10)
    assert outcome.exit_code == 0
    assert outcome.result is None
    assert outcome.error is not None
    assert reason in outcome.error


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        ({"output_path": "/x.npz", "samples": 1}, "missing required field `games`"),
        ({"output_path": "/x.npz", "samples": "1", "games": 1}, "got `str` - at `$.samples`"),
        ({"output_path": "/x.npz", "samples": 1, "games": -1}, ">= 0 - at `$.games`"),
        ({"output_path": 7, "samples": 1, "games": 1}, "at `$.output_path`"),
    ],
)
async def test_exit_0_with_a_bad_result_names_the_field(
    tmp_path: Path, payload: dict[str, object], reason: str
) -> None:
    outcome = await run_job(
        job(tmp_path, f"print({json.dumps(payload)!r})"), env=None, timeout_s=10
    )
    assert outcome.result is None
    assert outcome.error is not None
    assert reason in outcome.error


async def test_exit_0_with_a_missing_file_fails_validation(tmp_path: Path) -> None:
    payload = json.dumps({"output_path": str(tmp_path / "none.npz"), "samples": 1, "games": 1})
    outcome = await run_job(job(tmp_path, f"print({payload!r})"), env=None, timeout_s=10)
    assert outcome.result is None
    assert outcome.error == f"exit code 0 but output_path {tmp_path / 'none.npz'} does not exist"


async def test_nonzero_exit_fails_with_the_stderr_tail(tmp_path: Path) -> None:
    body = """
        import sys
        print("x" * 10_000, file=sys.stderr)
        print("database is locked", file=sys.stderr)
        sys.exit(3)
    """
    outcome = await run_job(job(tmp_path, body), env=None, timeout_s=10)
    assert outcome.exit_code == 3
    assert outcome.result is None
    assert outcome.error == "exit code 3: database is locked"
    assert outcome.stderr_tail.endswith("x\ndatabase is locked\n")
    assert len(outcome.stderr_tail) == STDERR_TAIL_BYTES


async def test_killed_by_a_signal_is_named(tmp_path: Path) -> None:
    outcome = await run_job(
        job(tmp_path, "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"),
        env=None,
        timeout_s=10,
    )
    assert outcome.exit_code == -9
    assert outcome.error == "killed by SIGKILL (no stderr)"


async def test_timeout_kills_the_job_and_its_child(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    outcome = await run_job(
        job(tmp_path, HANG_WITH_CHILD, str(pids)),
        env=None,
        timeout_s=TIMEOUT_S,
        term_grace_s=5.0,
    )
    assert outcome.timed_out
    assert outcome.exit_code is None
    assert outcome.error == "timed out after 0.5 s (no stderr)"
    # Both went on SIGTERM, well inside the long grace.
    assert outcome.duration_s < 3.0
    leader, child = await wait_for_pids(pids, 2)
    assert await wait_gone(leader)
    assert await wait_gone(child)


async def test_a_job_ignoring_sigterm_is_killed_after_the_grace(tmp_path: Path) -> None:
    body = """
        import signal, sys, time
        def note(signum, frame):
            print("got SIGTERM, carrying on", file=sys.stderr, flush=True)
        signal.signal(signal.SIGTERM, note)
        time.sleep(1000)
    """
    outcome = await run_job(
        job(tmp_path, body), env=None, timeout_s=TIMEOUT_S, term_grace_s=GRACE_S
    )
    assert outcome.timed_out
    assert outcome.exit_code is None
    assert outcome.duration_s >= TIMEOUT_S + GRACE_S
    assert outcome.error == "timed out after 0.5 s: got SIGTERM, carrying on"


async def test_leftover_children_are_killed_after_a_normal_exit(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    body = """
        import os, subprocess, sys
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1000)"])
        with open(sys.argv[1], "w") as f:
            f.write(f"{os.getpid()}\\n{child.pid}\\n")
        sys.exit(2)
    """
    outcome = await run_job(job(tmp_path, body, str(pids)), env=None, timeout_s=10)
    assert outcome.exit_code == 2
    assert outcome.duration_s < 2.0  # the child held the pipes open; it did not delay us
    _, child = await wait_for_pids(pids, 2)
    assert await wait_gone(child)


async def test_cancellation_kills_the_group_and_propagates(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    argv = job(tmp_path, HANG_WITH_CHILD, str(pids))
    task = asyncio.create_task(run_job(argv, env=None, timeout_s=60, term_grace_s=GRACE_S))
    leader, child = await wait_for_pids(pids, 2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await wait_gone(leader)
    assert await wait_gone(child)


async def test_output_held_by_an_escaped_process_does_not_hang(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    body = """
        import subprocess, sys
        escaped = subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(1000)"], start_new_session=True
        )
        with open(sys.argv[1], "w") as f:
            f.write(f"{escaped.pid}\\n")
        sys.exit(1)
    """
    try:
        outcome = await run_job(
            job(tmp_path, body, str(pids)), env=None, timeout_s=10, term_grace_s=GRACE_S
        )
        assert outcome.exit_code == 1
        assert outcome.duration_s < 2.0
    finally:
        (escaped,) = await wait_for_pids(pids, 1)
        os.kill(escaped, 9)


async def test_env_is_exactly_what_the_caller_gives(tmp_path: Path) -> None:
    body = """
        import json, os, sys
        print(json.dumps(dict(os.environ)), file=sys.stderr)
        sys.exit(1)
    """
    env = {"TRACEPARENT": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
    outcome = await run_job(job(tmp_path, body), env=env, timeout_s=10)
    seen = json.loads(outcome.stderr_tail)
    assert seen["TRACEPARENT"] == env["TRACEPARENT"]
    # Python itself may add LC_CTYPE when the locale is C (PEP 538); nothing else appears.
    assert set(seen) - {"LC_CTYPE"} == set(env)


async def test_a_job_that_cannot_start_fails_cleanly(tmp_path: Path) -> None:
    outcome = await run_job([str(tmp_path / "missing")], env=None, timeout_s=10)
    assert outcome.exit_code is None
    assert not outcome.timed_out
    assert outcome.error is not None
    assert outcome.error.startswith(f"cannot start {str(tmp_path / 'missing')!r}")


def test_build_argv_formats_each_element() -> None:
    template = ["exporter", "--board", "{board_type}", "--out={output_path}", "{num_players:02d}"]
    fields = {"board_type": "hex8", "output_path": "/data/a b.npz", "num_players": 2}
    assert build_argv(template, fields) == [
        "exporter",
        "--board",
        "hex8",
        "--out=/data/a b.npz",
        "02",
    ]


@pytest.mark.parametrize(
    ("element", "message"),
    [
        ("{board}", "unknown placeholder {board}"),
        ("{config.__class__}", "unknown placeholder {config.__class__}"),
        ("{0}", "unknown placeholder {0}"),
        ("{config:{width}}", "unknown placeholder {width}"),
        ("{config", "is malformed"),
    ],
)
def test_check_template_names_the_bad_placeholder(element: str, message: str) -> None:
    with pytest.raises(ValueError, match="export command") as info:
        check_template(["exporter", element], {"config", "board_type"})
    assert message in str(info.value)


def test_check_template_allows_known_fields_and_escaped_braces() -> None:
    check_template(["x", "{config}", "{{literal}}", "{config:>{config}}"], {"config"})


async def test_validate_output_hashes_a_valid_npz(tmp_path: Path) -> None:
    npz = write_npz(tmp_path / "ok.npz")
    validated = await validate_output(ExportOutput(output_path=str(npz), samples=3, games=1))
    data = npz.read_bytes()
    assert validated.size_bytes == len(data)
    assert validated.sha256 == hashlib.sha256(data).hexdigest()
    assert (validated.output_path, validated.samples, validated.games) == (str(npz), 3, 1)


def relative(tmp_path: Path) -> str:
    write_npz(tmp_path / "rel.npz")
    return os.path.relpath(tmp_path / "rel.npz")


def not_npz(tmp_path: Path) -> str:
    path = tmp_path / "out.zip"
    path.write_bytes(write_npz(tmp_path / "real.npz").read_bytes())
    return str(path)


def directory(tmp_path: Path) -> str:
    (tmp_path / "dir.npz").mkdir()
    return str(tmp_path / "dir.npz")


def truncated(tmp_path: Path) -> str:
    path = write_npz(tmp_path / "cut.npz")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return str(path)


def garbage(tmp_path: Path) -> str:
    path = tmp_path / "garbage.npz"
    path.write_bytes(b"not a zip at all" * 64)
    return str(path)


def flipped_byte(tmp_path: Path) -> str:
    path = tmp_path / "flipped.npz"
    data = bytearray(_zip({"a.npy": _npy(np.arange(1000))}))
    data[500] ^= 0xFF  # inside a.npy's data, past its header
    path.write_bytes(data)
    return str(path)


def object_array(tmp_path: Path) -> str:
    path = tmp_path / "objects.npz"
    np.savez(path, policy=np.array([[1, 2], [3]], dtype=object))
    return str(path)


def empty(tmp_path: Path) -> str:
    path = tmp_path / "empty.npz"
    path.write_bytes(_zip({}))
    return str(path)


def non_npy_member(tmp_path: Path) -> str:
    path = tmp_path / "notes.npz"
    path.write_bytes(_zip({"a.npy": _npy(np.ones(2)), "notes.txt": b"hello"}))
    return str(path)


def bad_header(tmp_path: Path) -> str:
    path = tmp_path / "header.npz"
    path.write_bytes(_zip({"a.npy": b"\x93NUMPY\x01\x00garbage"}))
    return str(path)


def short_data(tmp_path: Path) -> str:
    path = tmp_path / "short.npz"
    path.write_bytes(_zip({"a.npy": _npy(np.arange(100))[:-8]}))
    return str(path)


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _zip(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (relative, "is not absolute"),
        (lambda tmp_path: str(tmp_path / "missing.npz"), "does not exist"),
        (directory, "is not a regular file"),
        (not_npz, "does not end with .npz"),
        (truncated, "is not a valid zip"),
        (garbage, "is not a valid zip"),
        (flipped_byte, "Bad CRC-32 for file 'a.npy'"),
        (empty, "holds no arrays"),
        (non_npy_member, "member 'notes.txt' is not a .npy array"),
        (bad_header, "member 'a.npy' has no readable .npy header"),
        (short_data, "member 'a.npy' holds 792 data bytes, its header says 800"),
        (object_array, "member 'policy.npy' is an object array"),
    ],
)
async def test_validate_output_rejects(
    tmp_path: Path, make: Callable[[Path], str], reason: str
) -> None:
    output = ExportOutput(output_path=make(tmp_path), samples=1, games=1)
    with pytest.raises(OutputInvalid) as info:
        await validate_output(output)
    assert reason in str(info.value)
