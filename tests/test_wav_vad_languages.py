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


# (container, subtype, what read_wav calls it, max error as a fraction of full scale)
FORMATS = [
    ("WAV", "PCM_U8", "PCM 8-bit", 1 / 128),
    ("WAV", "PCM_16", "PCM 16-bit", 0),
    ("WAV", "PCM_24", "PCM 24-bit", 1 / 32768),
    ("WAV", "PCM_32", "PCM 32-bit", 1 / 32768),
    ("WAV", "FLOAT", "float 32-bit", 1 / 32768),
    ("WAV", "DOUBLE", "float 64-bit", 1 / 32768),
    ("WAV", "ULAW", "μ-law", 0.02),
    ("WAV", "ALAW", "A-law", 0.02),
    ("WAVEX", "PCM_16", "PCM 16-bit", 0),
    ("FLAC", "PCM_16", "FLAC PCM 16-bit", 0),
    ("FLAC", "PCM_24", "FLAC PCM 24-bit", 1 / 32768),
    ("OGG", "VORBIS", "OGG Vorbis", None),  # lossy: checked by correlation
    ("OGG", "OPUS", "OGG Opus", None),
]


@pytest.mark.parametrize("container, subtype, name, tolerance", FORMATS, ids=[f"{c}-{s}" for c, s, *_ in FORMATS])
def test_read_wav_decodes_every_format_libsndfile_writes(tmp_path, container, subtype, name, tolerance):
    import soundfile

    if not soundfile.check_format(container, subtype):
        pytest.skip(f"this libsndfile cannot write {container}/{subtype}")
    rate = 48000 if subtype == "OPUS" else 16000
    audio = speechlike(0.6, seed=3, rate=rate).astype(np.float64) * 0.8
    stereo = np.stack([audio, audio * 0.5], axis=1)  # two channels: read_wav averages them
    path = tmp_path / f"a.{ {'OGG': 'ogg', 'FLAC': 'flac'}.get(container, 'wav') }"
    soundfile.write(str(path), stereo, rate, format=container, subtype=subtype)
    wav = read_wav(path)
    expected = stereo.mean(axis=1) * 32768
    assert (wav.sample_rate, wav.channels, wav.encoding) == (rate, 2, name)
    assert wav.samples.dtype == np.int16
    if tolerance is None:
        n = min(len(wav.samples), len(expected))
        assert abs(len(wav.samples) - len(expected)) < 0.05 * rate
        assert np.corrcoef(wav.samples[:n], expected[:n])[0, 1] > 0.9
    else:
        assert len(wav.samples) == len(expected)
        assert np.abs(wav.samples - expected).max() / 32768 <= tolerance + 2 / 32768


def test_float_wav_beyond_full_scale_and_nan_are_clipped(tmp_path):
    import soundfile

    soundfile.write(str(tmp_path / "f.wav"), np.array([0.0, 2.0, -2.0, np.nan, 0.5]), 8000, subtype="FLOAT")
    assert read_wav(tmp_path / "f.wav").samples.tolist() == [0, 32767, -32768, 0, 16384]


@pytest.mark.parametrize("content", [b"RIFF\x00\x00\x00\x00WAVEjunkjunk", b"hello", b"\x00" * 100,
                                     b"fLaC" + bytes(range(256)), b"OggS" + b"\xff" * 60, b""],
                         ids=["riff-no-chunks", "text", "zeros", "flac-junk", "ogg-junk", "empty"])
def test_garbage_is_a_clear_error_naming_the_accepted_formats(tmp_path, content):
    (tmp_path / "junk.wav").write_bytes(content)
    with pytest.raises(WavError, match="junk.wav: cannot decode as audio .*accepted: WAV .*μ-law, A-law.*FLAC"):
        read_wav(tmp_path / "junk.wav")


def test_missing_file_and_bad_write_encoding(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_wav(tmp_path / "nothing.wav")
    with pytest.raises(ValueError, match="mulaw"):
        write_wav(tmp_path / "x.wav", np.zeros(10, np.int16), 8000, encoding="gsm")


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
