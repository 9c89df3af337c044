"""Text log lines stay one line each, whatever a publisher puts in a subject or payload."""

from __future__ import annotations

import logging
import sys

from consumer.logs import TextFormatter


def test_control_characters_in_a_message_are_escaped_but_a_traceback_stays_readable() -> None:
    formatter = TextFormatter("%(levelname)s %(message)s")
    try:
        raise ValueError("boom")
    except ValueError:
        exc_info = sys.exc_info()
    record = logging.LogRecord(
        "autoexport", logging.WARNING, __file__, 1, "rejected %s", ("a.\x1b[31m\nx",), exc_info
    )
    text = formatter.format(record)
    first, *rest = text.splitlines()
    assert first == "WARNING rejected a.\\x1b[31m\\nx"
    assert rest[0] == "Traceback (most recent call last):" and rest[-1] == "ValueError: boom"
