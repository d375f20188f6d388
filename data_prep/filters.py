"""Per-source quality filters. Each returns ``(keep, reason)``; the reason names the ledger entry.

Defaults follow DataComp's basic filtering and LAION's released thresholds: short side >= 200 px, aspect
ratio <= 3, captions of >= 2 words and >= 5 characters, CLIP similarity >= 0.28 (LAION-2B, ViT-B/32),
watermark probability < 0.8 and unsafe probability < 0.5. Score thresholds apply only to samples that
carry the score (a source with LAION metadata columns, or a configured scorer).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

KEEP = (True, "")
LANGUAGE_CANDIDATES = [
    "en",
    "de",
    "fr",
    "es",
    "it",
    "pt",
    "nl",
    "pl",
    "ru",
    "zh",
    "ja",
    "ko",
    "ar",
    "tr",
    "vi",
    "id",
    "sv",
]
"""Languages the identifier chooses among by default: restricting the choice makes short captions far more
reliable than all 140 languages of the model (data_prep.captions)."""
_CODE_RE = re.compile(r"^[a-z]{2,3}$")


@dataclass(kw_only=True)
class FilterConfig:
    min_side: int = 200
    """Reject images whose short side is below this (pixels, before resizing); 0 disables."""
    max_aspect: float = 3.0
    """Reject images whose long/short side ratio exceeds this; 0 disables."""
    min_words: int = 2
    """Reject texts with fewer whitespace-separated words; 0 disables."""
    min_chars: int = 5
    """Reject texts shorter than this many characters (after stripping); 0 disables."""
    max_words: int = 0
    """Reject texts with more words than this; 0 means no limit."""
    max_chars: int = 100_000
    """Reject texts longer than this many characters; 0 means no limit. The default is far past what a
    4096-token context trains on: a longer caption is a scraping accident (a page dump), not a caption."""
    min_scores: dict[str, float] = field(default_factory=lambda: {"clip": 0.28})
    """Score name -> lowest kept value (applied when the sample carries the score)."""
    max_scores: dict[str, float] = field(default_factory=lambda: {"watermark": 0.8, "nsfw": 0.5})
    """Score name -> value at or above which the sample is rejected (when the sample carries the score)."""
    fix_text: bool = False
    """Repair mojibake and broken Unicode in the text with ftfy before any check (the repaired text is kept)."""
    max_char_run: int = 0
    """Reject texts with a run of one character longer than this ("!!!!!!!!", "aaaaaaa"); 0 disables."""
    languages: list[str] = field(default_factory=list)
    """ISO 639-1 codes a text must be in (identified by py3langid); [] disables the check."""
    min_language_confidence: float = 0.5
    """Lowest identifier confidence (among language_candidates) for an allowed language to count."""
    language_candidates: list[str] = field(default_factory=lambda: list(LANGUAGE_CANDIDATES))
    """ISO 639-1 codes the identifier chooses among (languages must be among them)."""

    def __post_init__(self) -> None:
        for name in ("min_side", "min_words", "min_chars", "max_words", "max_chars", "max_char_run"):
            if getattr(self, name) < 0:
                raise ValueError(f"filters.{name} must be >= 0, got {getattr(self, name)}")
        if self.max_aspect != 0 and self.max_aspect < 1:
            raise ValueError(f"filters.max_aspect must be 0 (off) or >= 1, got {self.max_aspect}")
        if not 0.0 <= self.min_language_confidence <= 1.0:
            raise ValueError(f"filters.min_language_confidence must be in 0..1, got {self.min_language_confidence}")
        bad = [c for c in [*self.languages, *self.language_candidates] if not _CODE_RE.match(c)]
        if bad:
            raise ValueError(f"filters.languages / language_candidates: {bad} are not ISO 639-1 codes like 'en'")
        missing = sorted(set(self.languages) - set(self.language_candidates))
        if missing:
            raise ValueError(f"filters.languages {missing} are not in filters.language_candidates")


def filter_size(width: int, height: int, cfg: FilterConfig) -> tuple[bool, str]:
    short, long = min(width, height), max(width, height)
    if cfg.min_side and short < cfg.min_side:
        return False, "too_small"
    if cfg.max_aspect and long > cfg.max_aspect * short:
        return False, "bad_aspect_ratio"
    return KEEP


def filter_text(text: str | None, cfg: FilterConfig) -> tuple[bool, str]:
    if text is None:
        return KEEP
    stripped = text.strip()
    words = len(stripped.split())
    if (cfg.min_words and words < cfg.min_words) or (cfg.min_chars and len(stripped) < cfg.min_chars):
        return False, "text_too_short"
    if (cfg.max_words and words > cfg.max_words) or (cfg.max_chars and len(stripped) > cfg.max_chars):
        return False, "text_too_long"
    if cfg.max_char_run and has_run(stripped, cfg.max_char_run + 1):
        return False, "text_repeated_chars"
    return KEEP


def has_run(text: str, length: int) -> bool:
    """Whether one character repeats ``length`` times in a row (whitespace included: a page of blanks)."""
    return re.search(rf"(.)\1{{{length - 1}}}", text, re.DOTALL) is not None


def filter_scores(scores: Mapping[str, float], cfg: FilterConfig) -> tuple[bool, str]:
    for name, low in sorted(cfg.min_scores.items()):
        if name in scores and not scores[name] >= low:  # NaN fails too
            return False, f"score_{name}_low"
    for name, high in sorted(cfg.max_scores.items()):
        if name in scores and not scores[name] < high:
            return False, f"score_{name}_high"
    return KEEP
