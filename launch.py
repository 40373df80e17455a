"""Entry point: makes sure venv/ exists with the pinned requirements, then starts the web UI (or the tests).

    python3 launch.py [webui flags]     start the web UI
    python3 launch.py --test [pytest args]   install test requirements and run the test suite
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / "venv"
VENV_PYTHON = VENV / "bin" / "python"
CHROMIUM = Path("/usr/bin/chromium")


def run(cmd: list[str], **kwargs) -> None:
    print("$", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run(cmd, check=True, **kwargs)


def ensure_requirements(requirements: Path) -> None:
    """pip runs only when the requirements file changed since the last successful install."""
    stamp = VENV / f".installed-{requirements.name}"
    wanted = hashlib.sha256(requirements.read_bytes() + (ROOT / "requirements.txt").read_bytes()).hexdigest()
    if stamp.exists() and stamp.read_text() == wanted:
        return
    run([str(VENV_PYTHON), "-m", "pip", "install", "--disable-pip-version-check", "-r", str(requirements)], cwd=ROOT)
    stamp.write_text(wanted)


def ensure_chromium() -> None:
    """Browser tests drive the system's Chromium; the Debian package is installed when we are allowed to."""
    if CHROMIUM.exists() or shutil.which("apt-get") is None or os.geteuid() != 0:
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run(["apt-get", "update", "-q"], env=env)
    run(["apt-get", "install", "-y", "-q", "chromium", "chromium-driver"], env=env)


def main() -> None:
    args = sys.argv[1:]
    testing = args[:1] == ["--test"]
    if not VENV_PYTHON.exists():
        run([sys.executable, "-m", "venv", str(VENV)])
    ensure_requirements(ROOT / ("requirements-test.txt" if testing else "requirements.txt"))
    if testing:
        ensure_chromium()
        command = [str(VENV_PYTHON), "-m", "pytest", *args[1:]]
    else:
        command = [str(VENV_PYTHON), str(ROOT / "webui.py"), *args]
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    os.chdir(ROOT)
    os.execve(command[0], command, env)


if __name__ == "__main__":
    main()
