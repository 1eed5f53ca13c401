"""The bundled demo-model assets are present and well-formed (no model loading here: fast)."""

import json
import struct
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODELS = ROOT / "plugin" / "models"
HELDOUT = ROOT / "tests" / "data" / "demo_heldout"
LANGS = ["en-US", "es-ES", "de-DE"]

pytestmark = pytest.mark.skipif(not (MODELS / "demo.nemo").exists(), reason="demo model not built yet")


def _wav_format(path: Path):
    data = path.read_bytes()
    assert data[:4] == b"RIFF" and data[8:12] == b"WAVE"
    pos = 12
    while pos + 8 <= len(data):
        cid, size = data[pos:pos + 4], struct.unpack("<I", data[pos + 4:pos + 8])[0]
        if cid == b"fmt ":
            tag, ch, sr = struct.unpack("<HHI", data[pos + 8:pos + 16])
            bits = struct.unpack("<H", data[pos + 22:pos + 24])[0]
            return tag, ch, sr, bits
        pos += 8 + size + (size % 2)
    raise AssertionError(f"{path}: no fmt chunk")


def test_checkpoint_size():
    assert (MODELS / "demo.nemo").stat().st_size <= 10 * 1024 * 1024


def test_heldout_manifest_and_files():
    rows = [json.loads(line) for line in (HELDOUT / "manifest.jsonl").read_text(encoding="utf8").splitlines()]
    assert {r["lang"] for r in rows} == set(LANGS)
    for lang in LANGS:
        assert sum(r["lang"] == lang for r in rows) >= 15
    total = 0
    for r in rows:
        assert r["text"].endswith(f"<{r['lang']}>"), r
        p = HELDOUT / r["file"]
        assert _wav_format(p) == (7, 1, 8000, 8), p  # WAVE_FORMAT_MULAW, mono, 8 kHz
        total += p.stat().st_size
    assert total < 2 * 1024 * 1024


def test_sample_call():
    assert _wav_format(MODELS / "sample_call.wav") == (7, 1, 8000, 8)
    secs = ((MODELS / "sample_call.wav").stat().st_size - 60) / 8000
    assert 5.0 <= secs <= 11.0
    assert (MODELS / "sample_call.txt").read_text(encoding="utf8").strip()


def test_metrics_file():
    m = json.loads((MODELS / "demo_metrics.json").read_text())
    assert m["chunk_ms"] == 160
    for lang in LANGS:
        for k in ("wer_given", "wer_auto", "tag_acc_auto"):
            assert 0.0 <= m[lang][k] <= 2.0
    assert m["params"] > 0 and m["train_minutes"] > 0 and m["n_utts"] > 0


def test_mulaw_reader_roundtrip(tmp_path):
    import numpy as np

    from tools.demo_model.audio import decode_mulaw_to_16k, encode_mulaw_8k, read_mulaw_wav, write_mulaw_wav

    x = (0.3 * np.sin(np.arange(16000) * 2 * np.pi * 440 / 16000)).astype(np.float32)
    write_mulaw_wav(tmp_path / "a.wav", encode_mulaw_8k(x))
    ulaw, sr = read_mulaw_wav(tmp_path / "a.wav")
    assert sr == 8000 and len(ulaw) == 8000
    y = decode_mulaw_to_16k(ulaw)
    assert np.corrcoef(x[100:-100], y[100:-100])[0, 1] > 0.99
