"""Text cleaning: Unicode NFC, control characters, whitespace, broken encodings, lowercasing."""

from __future__ import annotations

import re
import unicodedata
from typing import Optional

from .config import CleanConfig
from .readers import Document
from .stage import DocumentStage, StageStats

REPLACEMENT_CHAR = "\ufffd"

# C0 and C1 controls except tab and newline (carriage returns become newlines first), the BOM
# and zero-width characters that only hide inside words.
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ufeff\u200b\u200c\u200d\u2060\u00ad]")
# Controls that separate words (str.split() splits on them): line breaks (form feed between the pages of
# pdftotext output, vertical tab, NEL, the file/group/record separators, Unicode's line and paragraph
# separators) become newlines and the unit separator a space before the others go, else "page.\fNext"
# would be cleaned to "page.Next" (and U+2028 would stay a line break that no "\n" rule sees).
_LINE_BREAK_CONTROLS = re.compile("[\x0b\x0c\x1c-\x1e\x85\u2028\u2029]")
# Unicode spaces (and tabs) after a visible character: a run of them becomes one ASCII space.
# Runs at the start of a line (indentation, which code needs) are left alone.
_INNER_SPACES = re.compile("(?<=\\S)[ \t\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]+")
# Only from the start of a run (the lookbehind): else a long run inside a line was tried again from each of
# its characters up to its end, quadratic (a line of 40,000 spaces then "x" took seconds).
_TRAILING_SPACES = re.compile("(?<![ \t\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000])"
                              "[ \t\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]+$", re.MULTILINE)
_BLANK_LINES = re.compile("\n{3,}")


def normalize_whitespace(text: str) -> str:
    """Space runs inside lines as one space, no trailing spaces, at most one blank line in a row,
    no blank lines at either end; indentation is kept."""
    text = _TRAILING_SPACES.sub("", text)
    text = _INNER_SPACES.sub(" ", text)
    text = _BLANK_LINES.sub("\n\n", text)
    return text.strip("\n")


def clean_text(text: str, config: Optional[CleanConfig] = None) -> str:
    """`text` cleaned as `config` says (replacement characters are kept: the stage counts them)."""
    cfg = config or CleanConfig()
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if cfg.remove_control:
        text = _LINE_BREAK_CONTROLS.sub("\n", text).replace("\x1f", " ")
        text = _CONTROL.sub("", text)
    if cfg.normalize_whitespace:
        text = normalize_whitespace(text)
    if cfg.lowercase:
        text = text.lower()
    # NFC last: a soft hyphen or zero-width character deleted above stood between a letter and its
    # combining mark ("cafe\u00ad\u0301" came out as "cafe\u0301", not "café"), and lower() can
    # undo NFC ("\u0130\u0327" lowercases to i, U+0307, U+0327: marks out of canonical order).
    if cfg.normalize_nfc:
        text = unicodedata.normalize("NFC", text)
    return text


class CleanStage(DocumentStage):
    """Cleans every document; drops those left empty or with too many U+FFFD (broken encodings)."""

    name = "clean"

    def __init__(self, config: CleanConfig):
        fraction = config.max_replacement_fraction
        if fraction is not None and not 0.0 <= fraction <= 1.0:
            raise ValueError(f"clean.max_replacement_fraction must be in [0, 1] or None, got {fraction}")
        self.config = config

    def keep(self, doc: Document, stats: StageStats) -> bool:
        doc.text = clean_text(doc.text, self.config)
        if not doc.text:
            stats.reject("empty_after_cleaning")
            return False
        replaced = doc.text.count(REPLACEMENT_CHAR)
        if replaced:
            stats.count("replacement_chars", replaced)
            stats.count("documents_with_replacement_chars")
            limit = self.config.max_replacement_fraction
            if limit is not None and replaced > limit * len(doc.text):
                stats.reject("broken_encoding")
                return False
        return True
