"""The examples run, as users run them: as programs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).parents[2] / "examples"


def test_demo_shows_events_and_a_reconnect() -> None:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "demo.py")], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "assistant: Mont Blanc, at about 4,806 metres." in result.stdout
    assert any(line.startswith("-- reconnected after") for line in lines)
    assert lines[-1].startswith("summary: 5 events received, 1 reconnect(s)")
