"""Language identification with py3langid, whose model ships inside the package (runs offline)."""

from __future__ import annotations

import functools

from .config import LangIdConfig
from .readers import Document
from .stage import DocumentStage, StageStats


@functools.lru_cache(maxsize=1)
def _identifier():
    try:
        from py3langid.langid import MODEL_FILE, LanguageIdentifier
    except ImportError:
        raise ImportError("language identification needs py3langid: pip install py3langid") from None
    # norm_probs: classify() returns a probability in [0, 1] rather than a log-score.
    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def supported_languages() -> list[str]:
    return list(_identifier().nb_classes)


UNDETERMINED = "und"  # ISO 639-2's code for "no language can be told"


def identify(text: str, max_chars: int = 4000) -> tuple[str, float]:
    """(ISO 639-1 code, probability) of the most likely language of `text`; ("und", 0.0) for text with
    no letter in its first max_chars (empty, digits, punctuation), which py3langid would call Serbian
    with a probability of 1/71: a language it has no evidence of, and one a `keep` list could keep."""
    head = text[:max_chars]
    if not any(ch.isalpha() for ch in head):
        return UNDETERMINED, 0.0
    lang, prob = _identifier().classify(head.replace("\n", " "))
    return str(lang), float(prob)


class LangIdStage(DocumentStage):
    """Keeps documents in a `keep` language with probability >= threshold; adds meta["language"]."""

    name = "langid"

    def __init__(self, config: LangIdConfig):
        if not 0.0 <= config.threshold <= 1.0:
            raise ValueError(f"langid.threshold must be in [0, 1], got {config.threshold}")
        if config.max_chars < 1:  # 0 classified empty text: every document "not kept", whatever its language
            raise ValueError(f"langid.max_chars must be >= 1, got {config.max_chars}")
        if not config.keep:
            raise ValueError("langid.keep must list at least one language code, got []")
        known = set(supported_languages())
        unknown = [code for code in config.keep if code not in known]
        if unknown:
            raise ValueError(f"langid.keep: unknown language codes {unknown}; py3langid knows {sorted(known)}")
        self.config = config
        self.keep_set = set(config.keep)

    def keep(self, doc: Document, stats: StageStats) -> bool:
        lang, prob = identify(doc.text, self.config.max_chars)
        doc.meta["language"] = lang
        doc.meta["language_score"] = round(prob, 4)
        stats.count(f"language_{lang}")
        if lang not in self.keep_set:
            stats.reject("language_not_kept")
            return False
        if prob < self.config.threshold:
            stats.reject("language_low_confidence")
            return False
        return True
