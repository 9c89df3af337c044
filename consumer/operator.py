"""The client side of operator commands: ask the running daemon, publish events by hand."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import nats
import nats.errors

from consumer.publish import publish_selfplay, publish_sync
from consumer.store import Store, StoreError
from consumer.streams import ensure_streams
from schemas.events import DataSyncCompleted, SelfplayCompleted

REQUEST_TIMEOUT_S = 5.0


class DaemonUnreachable(RuntimeError):
    pass


class RequestRefused(RuntimeError):
    pass


async def _connect(url: str, timeout_s: float) -> nats.aio.client.Client:
    """One short-lived connection that fails fast and quietly when the server is not there
    (nats-py's max_reconnect_attempts=0 means "forever", and it logs each try)."""

    async def quiet(exc: Exception) -> None:
        pass

    return await nats.connect(
        url,
        connect_timeout=timeout_s,
        max_reconnect_attempts=1,
        reconnect_time_wait=0.2,
        error_cb=quiet,
    )


async def request(url: str, subject: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    """One request to the daemon's micro service; raises with the daemon's own reason."""
    try:
        nc = await _connect(url, timeout_s=3)
    except (OSError, nats.errors.Error) as exc:
        raise DaemonUnreachable(f"cannot connect to NATS at {url}: {exc!r}") from None
    try:
        reply = await nc.request(
            subject, msgspec.json.encode(body or {}), timeout=REQUEST_TIMEOUT_S
        )
    except nats.errors.NoRespondersError:
        raise DaemonUnreachable(f"no autoexport daemon answers on {url}") from None
    except nats.errors.TimeoutError:
        raise DaemonUnreachable(
            f"the daemon on {url} did not answer in time (a busy or stopped daemon still"
            " carries the request out when it gets to it: check with status)"
        ) from None
    finally:
        await nc.close()
    headers = reply.headers or {}
    if "Nats-Service-Error" in headers:
        raise RequestRefused(headers["Nats-Service-Error"])
    return msgspec.json.decode(reply.data)


async def status_from_file(state_db: str) -> dict[str, Any]:
    """A stopped daemon's state; never creates a file where there was none."""
    if not Path(state_db).is_file():
        raise DaemonUnreachable(f"no state database at {state_db}")
    try:
        async with await Store.open_readonly(state_db) as store:
            status = await store.status()
    except StoreError as exc:
        raise DaemonUnreachable(str(exc)) from None
    # Read from a file, an export "in progress" is one the next start resumes.
    for state in status["states"].values():
        state["interrupted"] = state["in_progress"]
    return status


async def publish_event(url: str, event: SelfplayCompleted | DataSyncCompleted) -> dict[str, Any]:
    try:
        nc = await _connect(url, timeout_s=5)
    except (OSError, nats.errors.Error) as exc:
        raise DaemonUnreachable(f"cannot connect to NATS at {url}: {exc!r}") from None
    try:
        js = nc.jetstream()
        await ensure_streams(js)
        if isinstance(event, SelfplayCompleted):
            ack = await publish_selfplay(js, event)
        else:
            ack = await publish_sync(js, event)
    finally:
        await nc.close()
    return {"stream": ack.stream, "seq": ack.seq, "duplicate": bool(ack.duplicate)}


def render_status(status: dict[str, Any]) -> str:
    """A table for people; ``--json`` gives the full structure."""
    lines = [
        f"configs tracked: {status['configs_tracked']}   "
        f"rejected messages: {status['rejected_messages']}   "
        f"running exports: {len(status.get('running_exports', []))}"
    ]
    header = f"{'config':<16} {'pending':>8} {'last export':>12} {'samples':>10} {'fail':>4}  state"
    lines.append(header)
    for config, st in status["states"].items():
        ago = "never" if st["last_export"] is None else f"{st['last_export']:.0f}s ago"
        state = (
            "interrupted (resumed at the next start)" if st.get("interrupted")
            else "exporting" if st["in_progress"]
            else "paused" if st["paused"]
            else st.get("held") or ("failing" if st["failures"] else "idle")
        )  # fmt: skip
        if st.get("last_error"):
            state += f" (last error: {st['last_error'][:80]})"
        lines.append(
            f"{config:<16} {st['games_pending']:>8} {ago:>12} {st['total_samples']:>10} "
            f"{st['failures']:>4}  {state}"
        )
    if status.get("states_omitted"):
        lines.append(
            f"... and {status['states_omitted']} more configs (a status over NATS must fit in"
            " one message; `autoexport status --state-db FILE` shows them all)"
        )
    return "\n".join(lines)


def build_event(fields: dict[str, Any]) -> SelfplayCompleted | DataSyncCompleted:
    """A validated event from CLI fields (the same strict types the daemon decodes)."""
    common = {
        "event_id": fields.get("event_id") or str(uuid.uuid4()),
        "board_type": fields["board_type"],
        "num_players": fields["num_players"],
        "timestamp": datetime.now(UTC),
    }
    if fields["kind"] == "selfplay":
        data = {
            **common,
            "games": fields["games"],
            "node_id": fields["node_id"],
            "batch_id": fields.get("batch_id"),
            "db_path": fields.get("db_path"),
        }
        return msgspec.convert(data, SelfplayCompleted)
    batches = None
    if fields.get("batch"):
        batches = []
        for item in fields["batch"]:
            batch_id, sep, games = item.rpartition(":")
            if not sep or not games.isdigit():
                raise ValueError(f"--batch {item!r} is not BATCH_ID:GAMES")
            batches.append({"batch_id": batch_id, "games": int(games)})
    data = {
        **common,
        "source_node": fields["source_node"],
        "batches": batches,
        "games_synced": fields.get("games_synced"),
    }
    return msgspec.convert(data, DataSyncCompleted)
