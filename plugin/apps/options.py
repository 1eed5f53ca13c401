"""Checks of the commands' options that run before any model is loaded (and before torch or NeMo is imported).

A bad chunk size, device, locale or model path is reported in a second, not after a 20 s model load. For a local
`.nemo` file (the bundled demo model included) the languages it knows are read from the `model_config.yaml` inside
the checkpoint's tar, without loading its weights; for a Hugging Face id they are known only once it is loaded, so the
engine checks them then.
"""

from __future__ import annotations

import ipaddress
import re
import tarfile
from pathlib import Path

# The engine's CHUNK_MS_TO_RIGHT_CONTEXT keys (pipecat_nemotron.engine.loader imports torch, so not imported here;
# tests/test_cli.py checks the two agree).
CHUNK_SIZES_MS = (80, 160, 320, 560, 1120)
DEMO_MODEL = "demo"
AUTO = "auto"
_LOCALE_SYNTAX = re.compile(r"^(?P<lang>[A-Za-z]{2,3})(?:[-_](?P<region>[A-Za-z]{2}))?$")
_DEVICE_SYNTAX = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


class OptionError(ValueError):
    """An option value the command cannot run with; the message says what would work."""


def check_chunk_ms(chunk_ms: int) -> int:
    if chunk_ms not in CHUNK_SIZES_MS:
        raise OptionError(f"--chunk-ms must be one of {', '.join(map(str, CHUNK_SIZES_MS))}, not {chunk_ms}")
    return chunk_ms


PRECISIONS = ("fp32", "int8")


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise OptionError(f"--precision must be fp32 or int8 (CPU), not {precision!r}")
    return precision


def check_device(device: str) -> str:
    if not _DEVICE_SYNTAX.match(device):
        raise OptionError(f"--device must be auto, cpu, cuda or cuda:N, not {device!r}")
    return device


def model_path(model: str) -> Path | None:
    """The local checkpoint file a --model value names (the demo model's bundled file for 'demo'), or None for a
    Hugging Face id. Raises `OptionError` for a path that does not exist."""
    if model == DEMO_MODEL:
        from importlib import resources

        return Path(str(resources.files("pipecat_nemotron").joinpath("models", "demo.nemo")))
    path = Path(model).expanduser()
    if model.endswith(".nemo") or path.exists():
        if not path.is_file():
            raise OptionError(f"--model {model}: no such .nemo file. Give a .nemo path, a Hugging Face id such as "
                              "nvidia/nemotron-3.5-asr-streaming-0.6b, or 'demo' for the bundled demo model")
        return path
    return None


def model_languages(model: str) -> set[str] | None:
    """The locales of a local .nemo checkpoint's prompt dictionary ('auto' included), read from its
    `model_config.yaml` without loading weights; None when unknown before loading (a Hugging Face id, a config
    without a prompt dictionary, an unreadable tar: the engine checks after loading)."""
    path = model_path(model)
    if path is None:
        return None
    try:
        import yaml

        with tarfile.open(path, "r:*") as tar:
            member = next((m for m in tar if m.isfile() and Path(m.name).name == "model_config.yaml"), None)
            if member is None:
                return None
            config = yaml.safe_load(tar.extractfile(member))
        table = (config.get("model_defaults") or {}).get("prompt_dictionary") or {}
    except (OSError, tarfile.TarError, AttributeError, ValueError) as error:  # yaml.YAMLError is a ValueError
        del error
        return None
    return {str(key) for key in table} or None


def normalize_locale(language: str) -> str:
    """'auto', or the model locale for a --language value ('de-DE', 'de_de', 'de'); `OptionError` when the value is
    not a locale at all or not one of nemotron-3.5's 40."""
    text = language.strip()
    if text.lower() == AUTO:
        return AUTO
    match = _LOCALE_SYNTAX.match(text)
    if not match:
        raise OptionError(f"--language {language!r} is not a locale: use e.g. en-US, de-DE, es (its default "
                          "region), or auto to detect")
    code = match["lang"].lower() + (f"-{match['region'].upper()}" if match["region"] else "")
    from ..engine.errors import UnsupportedLanguageError
    from ..languages import language_to_locale

    try:
        return language_to_locale(code)
    except UnsupportedLanguageError as error:
        raise OptionError(f"--language {language}: {error}") from None


def check_language(language: str, model: str) -> str:
    """`normalize_locale`, then against the model's own prompt dictionary where it can be read without loading."""
    locale = normalize_locale(language)
    known = model_languages(model)
    if locale != AUTO and known is not None and locale not in known:
        others = ", ".join(sorted(k for k in known if k != AUTO))
        raise OptionError(f"--language {locale}: model {model} has no prompt for it; it knows {others} "
                          f"(or auto to detect)")
    return locale


def check_tls(cert: str | None, key: str | None, port: int) -> None:
    """--tls-cert/--tls-key/--tls-port: the certificate and key load (so a typo fails now, not at the first call)."""
    if key and not cert:
        raise OptionError("--tls-key needs --tls-cert")
    if not 0 <= port <= 65535:
        raise OptionError(f"--tls-port must be a port number (0-65535), not {port}")
    if cert:
        from ..transports.sip.tls import TLSConfigError, server_context

        try:
            server_context(cert=cert, key=key)
        except TLSConfigError as error:
            raise OptionError(f"--tls-cert/--tls-key: {error}") from None


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


__all__ = ["CHUNK_SIZES_MS", "OptionError", "check_chunk_ms", "check_device", "check_language", "check_tls",
           "is_loopback", "model_languages", "model_path", "normalize_locale"]
