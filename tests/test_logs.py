"""agent.logs: JSON lines that parse, readable text, a rotating file, idempotent set-up."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.logs import BACKUP_COUNT, MAX_BYTES, setup_logging


@pytest.fixture(autouse=True)
def restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in root.handlers:
        if handler not in handlers:
            handler.close()
    root.handlers[:] = handlers
    root.setLevel(level)


def test_json_lines_parse_and_carry_extra_fields(tmp_path: Path) -> None:
    stream = io.StringIO()
    path = setup_logging("info", "json", tmp_path / "logs", stream=stream)
    log = logging.getLogger("flock.test")
    log.info("placed %s on %d nodes", "smollm2", 3, extra={"model": "smollm2", "ranks": [0, 1]})
    log.debug("not at info level")
    try:
        raise ValueError("bad shard")
    except ValueError:
        log.exception("load failed")

    for text in (stream.getvalue(), path.read_text(encoding="utf-8")):
        lines = [json.loads(line) for line in text.splitlines()]
        assert len(lines) == 2
        first, second = lines
        assert first["msg"] == "placed smollm2 on 3 nodes"
        assert first["level"] == "info" and first["logger"] == "flock.test"
        assert first["model"] == "smollm2" and first["ranks"] == [0, 1]
        assert first["ts"].endswith("Z")
        assert second["level"] == "error" and "ValueError: bad shard" in second["exc"]


def test_text_format_is_one_readable_line(tmp_path: Path) -> None:
    stream = io.StringIO()
    setup_logging("debug", "text", None, stream=stream)
    logging.getLogger("flock.x").debug("hello")
    line = stream.getvalue().strip()
    assert line.endswith("DEBUG   flock.x: hello")
    assert not line.startswith("{")


def test_file_rotates_and_keeps_a_bounded_number(tmp_path: Path) -> None:
    assert MAX_BYTES == 10 * 1024 * 1024 and BACKUP_COUNT == 5
    logs = tmp_path / "logs"
    path = setup_logging("info", "json", logs, console=False, max_bytes=2000, backup_count=3)
    assert path == logs / "flock.log"
    log = logging.getLogger("flock.rotate")
    for i in range(400):
        log.info("line %d %s", i, "x" * 40)
    names = sorted(p.name for p in logs.iterdir())
    assert names == ["flock.log", "flock.log.1", "flock.log.2", "flock.log.3"]
    for p in logs.iterdir():
        assert p.stat().st_size <= 2000
        for line in p.read_text(encoding="utf-8").splitlines():
            json.loads(line)  # rotation never splits a line


def test_calling_again_replaces_only_its_own_handlers(tmp_path: Path) -> None:
    other = logging.NullHandler()
    logging.getLogger().addHandler(other)
    first, second = io.StringIO(), io.StringIO()
    setup_logging("info", "text", tmp_path, stream=first)
    setup_logging("info", "json", tmp_path, stream=second, file_name="runner-m.log")
    logging.getLogger("flock").info("once")
    assert first.getvalue() == ""
    assert json.loads(second.getvalue())["msg"] == "once"
    assert other in logging.getLogger().handlers
    assert "once" not in (tmp_path / "flock.log").read_text(encoding="utf-8")
    assert "once" in (tmp_path / "runner-m.log").read_text(encoding="utf-8")


def test_console_off_writes_only_the_file(tmp_path: Path) -> None:
    stream = io.StringIO()
    path = setup_logging("info", "text", tmp_path, console=False, stream=stream)
    logging.getLogger("flock").warning("disk only")
    assert stream.getvalue() == ""
    assert path is not None and "disk only" in path.read_text(encoding="utf-8")


def test_chatty_libraries_are_quiet_unless_debugging(tmp_path: Path) -> None:
    stream = io.StringIO()
    setup_logging("info", "text", None, stream=stream)
    logging.getLogger("httpx").info("HTTP Request: GET http://peer/healthz 200")
    assert stream.getvalue() == ""
    setup_logging("debug", "text", None, stream=stream)
    logging.getLogger("httpx").info("HTTP Request: GET http://peer/healthz 200")
    assert "healthz" in stream.getvalue()


def test_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError, match="log format"):
        setup_logging("info", "xml", None)  # type: ignore[arg-type]
