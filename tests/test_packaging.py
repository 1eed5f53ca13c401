"""A normal (non-editable) install carries both import packages and the bundled model."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_wheel_maps_plugin_and_transports(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(ROOT)], check=True)
    wheel = next(tmp_path.glob("pipecat_nemotron-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "pipecat_nemotron/__init__.py" in names
    assert "pipecat_nemotron/engine/scheduler.py" in names
    assert "pipecat_nemotron/apps/cli.py" in names and "pipecat_nemotron/apps/phone.py" in names
    assert "pipecat_nemotron/transports/__init__.py" in names
    assert "pipecat_nemotron/transports/sip/uas.py" in names
    assert "pipecat_nemotron/transports/g711.py" in names
    assert "pipecat_nemotron/static/index.html" in names
    assert not any(name.startswith(("plugin/", "transports/", "tests/")) for name in names)

    target = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(target)
    probe = ("import sys; sys.path.insert(0, sys.argv[1]); import pipecat_nemotron, pipecat_nemotron.transports, "
             "pipecat_nemotron.engine; assert pipecat_nemotron.__file__.startswith(sys.argv[1]), pipecat_nemotron.__file__")
    subprocess.run([sys.executable, "-c", probe, str(target)], check=True, cwd=tmp_path)
