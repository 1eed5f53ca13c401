import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent))  # tools/ for the demo-model training code

from tiny import build_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A tiny EncDecRNNTBPEModelWithPrompt (multi-lookahead, causal, dw_striding x8), random weights."""
    import torch

    torch.set_num_threads(2)
    return build_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
async def tiny_engine(tiny_model):
    """An Engine on the tiny model (160 ms chunks, CPU, 4 streams), closed after the test."""
    from pipecat_nemotron.engine import Engine

    engine = Engine(model=tiny_model, chunk_ms=160, device="cpu", max_streams=4)
    await engine.ready()
    yield engine
    engine.close()
