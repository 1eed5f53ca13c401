"""The 40 locales of nemotron-3.5-asr-streaming, their support tier, and Pipecat `Language` both ways."""

from __future__ import annotations

import logging
from enum import Enum

from pipecat.transcriptions.language import Language

from .engine.errors import UnsupportedLanguageError
from .engine.results import TAG_PATTERN, split_language_tags

logger = logging.getLogger(__name__)


class Tier(str, Enum):
    """NVIDIA's support tiers for the model's locales."""

    TRANSCRIPTION_READY = "transcription-ready"
    BROAD_COVERAGE = "broad-coverage"
    ADAPTATION_READY = "adaptation-ready"  # needs fine-tuning before production use


_TIERS = {
    Tier.TRANSCRIPTION_READY: "en-US en-GB es-US es-ES fr-FR fr-CA it-IT pt-BR pt-PT nl-NL de-DE tr-TR ru-RU ar-AR "
                              "hi-IN ja-JP ko-KR vi-VN uk-UA",
    Tier.BROAD_COVERAGE: "pl-PL sv-SE cs-CZ nb-NO da-DK bg-BG fi-FI hr-HR sk-SK zh-CN hu-HU ro-RO et-EE",
    Tier.ADAPTATION_READY: "el-GR lt-LT lv-LV mt-MT sl-SI he-IL th-TH nn-NO",
}
LOCALE_TIERS: dict[str, Tier] = {locale: tier for tier, names in _TIERS.items() for locale in names.split()}
AUTO = "auto"

# NVIDIA writes Arabic as ar-AR, which Pipecat's enum lacks: it is generic Arabic.
_LOCALE_TO_LANGUAGE_OVERRIDES = {"ar-AR": Language.AR}
# A base Language (e.g. Language.EN) picks this locale.
_BASE_DEFAULTS = {"en": "en-US", "es": "es-ES", "fr": "fr-FR", "pt": "pt-BR", "no": "nb-NO", "zh": "zh-CN"}


def locale_to_language(locale: str | None) -> Language | None:
    """The Pipecat `Language` of a model locale ('es-ES' -> Language.ES_ES); None for None/'auto'."""
    if locale is None or locale == AUTO:
        return None
    if locale in _LOCALE_TO_LANGUAGE_OVERRIDES:
        return _LOCALE_TO_LANGUAGE_OVERRIDES[locale]
    try:
        return Language(locale)
    except ValueError:
        base = locale.split("-")[0]
        try:
            return Language(base)
        except ValueError:
            return None


def language_to_locale(language: Language | str | None) -> str:
    """The model locale for a Pipecat `Language`; None means 'auto' (detect).

    Raises `UnsupportedLanguageError` listing the supported locales; warns for the
    adaptation-ready tier, which NVIDIA says needs fine-tuning.
    """
    if language is None or language == AUTO:
        return AUTO
    code = language.value if isinstance(language, Language) else str(language)
    locale = _match_locale(code)
    if locale is None:
        raise UnsupportedLanguageError(
            f"{code!r} is not a nemotron-3.5-asr-streaming locale. Supported: "
            + "; ".join(f"{tier.value}: {', '.join(names.split())}" for tier, names in _TIERS.items())
            + ". Use language=None for automatic detection.")
    if LOCALE_TIERS[locale] is Tier.ADAPTATION_READY:
        logger.warning("%s is an adaptation-ready locale of nemotron-3.5: expect poor accuracy without fine-tuning",
                       locale)
    return locale


def _match_locale(code: str) -> str | None:
    if code in LOCALE_TIERS:
        return code
    for locale, language in _LOCALE_TO_LANGUAGE_OVERRIDES.items():
        if code == language.value:
            return locale
    base = code.split("-")[0].lower()
    if "-" not in code:
        default = _BASE_DEFAULTS.get(base)
        if default:
            return default
        candidates = [locale for locale in LOCALE_TIERS if locale.split("-")[0] == base]
        return candidates[0] if len(candidates) == 1 else None
    return None


def parse_language_tags(text: str) -> tuple[str, list[Language | None]]:
    """Strip `<xx-YY>` tags from model text; return (clean text, their Languages in order)."""
    clean, tags = split_language_tags(text)
    return clean, [locale_to_language(tag) for tag in tags]


__all__ = ["AUTO", "LOCALE_TIERS", "TAG_PATTERN", "Tier", "language_to_locale", "locale_to_language",
           "parse_language_tags"]
