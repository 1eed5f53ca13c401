"""The package root exports what a user needs, lazily: the engine alone never pulls in Pipecat."""

import subprocess
import sys

import pytest

import pipecat_nemotron


def _modules_after(statement: str) -> set[str]:
    probe = f"import sys; {statement}; print(' '.join(sorted(m.split('.')[0] for m in sys.modules)))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120)
    return set(result.stdout.split())


def test_engine_import_does_not_pull_in_pipecat():
    loaded = _modules_after("import pipecat_nemotron.engine; from pipecat_nemotron import Engine, Final")
    assert "torch" in loaded  # the probe really imported the engine
    assert "pipecat" not in loaded


def test_package_root_import_is_light():
    loaded = _modules_after("import pipecat_nemotron")
    assert not loaded & {"pipecat", "torch", "nemo"}, loaded & {"pipecat", "torch", "nemo"}


@pytest.mark.parametrize("name", pipecat_nemotron.__all__)
def test_every_exported_name_resolves(name):
    assert getattr(pipecat_nemotron, name) is not None
    assert name in dir(pipecat_nemotron)


def test_the_readme_names_come_from_their_modules():
    from pipecat_nemotron import EmptyTranscriptUserTurnStopStrategy, NemotronSTTService, WebRTCVADAnalyzer
    from pipecat_nemotron.stt import NemotronSTTService as FromStt
    from pipecat_nemotron.turns import EmptyTranscriptUserTurnStopStrategy as FromTurns
    from pipecat_nemotron.vad import WebRTCVADAnalyzer as FromVad

    assert (NemotronSTTService, WebRTCVADAnalyzer, EmptyTranscriptUserTurnStopStrategy) == (FromStt, FromVad, FromTurns)
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        pipecat_nemotron.nothing_here  # noqa: B018
