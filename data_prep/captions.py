"""Caption checks that need more than counting: ftfy text repair and language identification.

Length, word-count and repeated-character checks are plain filters (data_prep.filters.filter_text). Here:

- ``repair_text``: ftfy's ``fix_text`` (mojibake such as "cafÃ©" -> "café", HTML entities, broken
  surrogates, curly-quote debris). It runs before the text is hashed and checked, and the repaired text is
  what the shard stores.
- :class:`LanguageChecker`: py3langid (a naive Bayes model over byte n-grams; BSD-3-Clause; its model ships
  inside the wheel as an xz-compressed ``.npz``, read without unpickling, so nothing is downloaded). The
  identifier chooses among ``filters.language_candidates`` with normalised probabilities; a text is rejected
  as ``text_language`` unless its most likely language is in ``filters.languages`` with at least
  ``filters.min_language_confidence``. Loading the model takes ~0.6 s and ~100 MB, so it runs once per
  actor of a Ray Data actor pool (data_prep.score_stages), never per sample.
"""

from __future__ import annotations

from collections.abc import Sequence

from data_prep.filters import FilterConfig

LANGUAGE_REASON = "text_language"


def repair_text(text: str) -> str:
    """ftfy's repair of mojibake and broken Unicode (a no-op on clean text)."""
    import ftfy

    return ftfy.fix_text(text)


class LanguageChecker:
    """Loads the language identifier once; checks texts against a source's allowed languages."""

    def __init__(self) -> None:
        from py3langid.langid import MODEL_FILE, LanguageIdentifier

        self.identifier = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
        self.known = set(self.identifier.nb_classes)
        self._candidates: tuple[str, ...] = ()

    def _restrict(self, candidates: Sequence[str]) -> None:
        wanted = tuple(sorted(set(candidates)))
        if wanted == self._candidates:
            return
        unknown = sorted(set(wanted) - self.known)
        if unknown:
            raise ValueError(f"filters.language_candidates {unknown}: not languages py3langid identifies")
        self.identifier.set_languages(list(wanted))
        self._candidates = wanted

    def check(self, texts: Sequence[str | None], cfg: FilterConfig) -> list[str | None]:
        """Per text: None when it passes (or is None / the check is off), else the reject detail
        "<language> <confidence>"."""
        if not cfg.languages:
            return [None] * len(texts)
        self._restrict(cfg.language_candidates)
        allowed = set(cfg.languages)
        out: list[str | None] = []
        for text in texts:
            if text is None:
                out.append(None)
                continue
            lang, conf = self.identifier.classify(text)
            ok = lang in allowed and conf >= cfg.min_language_confidence
            out.append(None if ok else f"{lang} {conf:.3f}")
        return out


def check_languages(cfg: FilterConfig) -> None:
    """Job-start check that every configured language is one the identifier knows."""
    if cfg.languages:
        LanguageChecker()._restrict(cfg.language_candidates)
