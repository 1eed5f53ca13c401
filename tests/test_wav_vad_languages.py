"""WAV decoding, the WebRTC VAD analyzer and the locale table."""

import numpy as np
import pytest
from pipecat.audio.vad.vad_analyzer import VADParams
from pipecat.transcriptions.language import Language

from pipecat_nemotron.engine import UnsupportedLanguageError
from pipecat_nemotron.languages import LOCALE_TIERS, Tier, language_to_locale, locale_to_language, parse_language_tags
from pipecat_nemotron.vad import WebRTCVADAnalyzer
from pipecat_nemotron.wav import WavError, read_wav, write_wav
from tiny import speechlike


@pytest.mark.parametrize("encoding, tolerance", [("pcm", 0), ("mulaw", 0.02), ("alaw", 0.02)])
def test_wav_round_trip(tmp_path, encoding, tolerance):
    audio = (speechlike(0.5, seed=1, rate=8000) * 32767).astype(np.int16)
    write_wav(tmp_path / "a.wav", audio, 8000, encoding=encoding)
    wav = read_wav(tmp_path / "a.wav")
    assert wav.sample_rate == 8000 and len(wav.samples) == len(audio)
    error = np.abs(wav.samples.astype(float) - audio) / 32768
    assert error.max() <= tolerance + 1e-4


def test_wav_garbage_is_a_clear_error(tmp_path):
    (tmp_path / "junk.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunkjunk")
    with pytest.raises(WavError, match="fmt"):
        read_wav(tmp_path / "junk.wav")
    (tmp_path / "text.wav").write_text("hello")
    with pytest.raises(WavError, match="RIFF"):
        read_wav(tmp_path / "text.wav")


def test_locale_table_has_40_locales_in_three_tiers():
    assert len(LOCALE_TIERS) == 40
    counts = {tier: sum(1 for t in LOCALE_TIERS.values() if t is tier) for tier in Tier}
    assert counts == {Tier.TRANSCRIPTION_READY: 19, Tier.BROAD_COVERAGE: 13, Tier.ADAPTATION_READY: 8}
    for locale in LOCALE_TIERS:
        language = locale_to_language(locale)
        assert language is not None, locale
        assert language_to_locale(language) == locale, locale


def test_language_mapping_edges(caplog):
    assert locale_to_language("ar-AR") == Language.AR
    assert language_to_locale(Language.AR) == "ar-AR"
    assert language_to_locale(Language.EN) == "en-US"
    assert language_to_locale(None) == "auto"
    with pytest.raises(UnsupportedLanguageError, match="Supported: transcription-ready: en-US"):
        language_to_locale(Language.SW)
    language_to_locale(Language.TH_TH)
    assert "adaptation-ready" in caplog.text
    assert parse_language_tags("Hola. <es-ES> Hi. <en-US>") == ("Hola. Hi.", [Language.ES_ES, Language.EN_US])


def _vad_confidences(rate, audio_int16):
    analyzer = WebRTCVADAnalyzer(mode=3, params=VADParams())  # fresh: webrtcvad has a hang-over state
    analyzer.set_sample_rate(rate)
    step = analyzer.num_frames_required()
    return [analyzer.voice_confidence(audio_int16[i:i + step].tobytes())
            for i in range(0, len(audio_int16) - step + 1, step)]


@pytest.mark.parametrize("rate", [8000, 16000, 32000, 48000])
def test_webrtc_vad_separates_speech_from_silence_and_noise(rate):
    speech = (speechlike(2.0, seed=2, rate=rate) * 32767 * 2).clip(-32767, 32767).astype(np.int16)
    silence = np.zeros(2 * rate, dtype=np.int16)
    noise = (np.random.default_rng(0).standard_normal(2 * rate) * 300).astype(np.int16)
    assert np.mean(_vad_confidences(rate, speech)) > 0.6
    assert np.mean(_vad_confidences(rate, silence)) == 0.0
    assert np.mean(_vad_confidences(rate, noise)) < 0.3


def test_webrtc_vad_refuses_other_rates():
    with pytest.raises(ValueError, match="resample"):
        WebRTCVADAnalyzer(sample_rate=22050)
    with pytest.raises(ValueError, match="mode"):
        WebRTCVADAnalyzer(mode=5)
