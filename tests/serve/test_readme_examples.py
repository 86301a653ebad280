"""The README's first examples work right after the command they follow: `make serve` installs what they
import, and run as written (port and interpreter substituted) against the real `longcat2 serve` of the
embedded model, they print what the README says."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from serve_helpers import free_port, wait_healthy

from longcat2.model_dir import DEFAULT_MODEL_DIR

tomllib = pytest.importorskip("tomllib")  # Python 3.11+
REPO = Path(__file__).resolve().parents[2]


def _serve_examples() -> str:
    """The first bash block after the one that runs `make serve`: the client examples."""
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    first = next(i for i, b in enumerate(blocks) if b.lstrip().startswith("make serve"))
    return blocks[first + 1]


def _make_serve_requirements() -> set[str]:
    """Distribution names `make serve` installs: the dependencies plus the extras its setup.sh call names."""
    target = re.search(r"^serve:\n((?:\t.*\n)+)", (REPO / "Makefile").read_text(), re.M)
    assert target, "Makefile: no serve target"
    setup = next(line for line in target.group(1).splitlines() if "scripts/setup.sh" in line)
    extras = re.findall(r"--(\w+)", setup)
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in extras:
        reqs += project["optional-dependencies"][extra]
    return {re.split(r"[<>=!~\[ ;]", r, maxsplit=1)[0].lower() for r in reqs}


def test_make_serve_installs_what_the_examples_import():
    imported = set(re.findall(r"import (\w+)", _serve_examples()))
    assert imported, "the examples import no SDK any more: update this test"
    assert imported <= _make_serve_requirements(), imported - _make_serve_requirements()


@pytest.mark.skipif(not (DEFAULT_MODEL_DIR / "config.json").is_file(), reason="no embedded default model")
@pytest.mark.skipif(shutil.which("curl") is None, reason="no curl")
def test_examples_run_as_written_against_make_serves_server(tmp_path):
    port = free_port()
    script = _serve_examples().replace(":8000", f":{port}").replace(".venv/bin/python", sys.executable)
    proc = subprocess.Popen([sys.executable, "-m", "longcat2", "serve", "--port", str(port), "--threads", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        wait_healthy(proc, f"http://127.0.0.1:{port}")
        r = subprocess.run(["bash", "-euo", "pipefail", "-c", script], capture_output=True, text=True, timeout=120,
                           env={**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", "")})  # fmt: skip
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    assert r.returncode == 0, r.stderr
    assert '"name":"get_weather"' in r.stdout.replace(" ", "") and "Paris" in r.stdout  # curl: the tool call
    assert "I am LongCat" in r.stdout.rsplit("}", 1)[-1]  # anthropic: its answer printed after curl's JSON
