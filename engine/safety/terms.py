"""The words, phrases and patterns a prompt may not hold (safety.blocked_terms).

A word or phrase matches whole and case-blind: "gore" finds "Gore" and "GORE" but not "gorey" or "allegory", and
"blood bath" finds "Blood   bath" across any run of spaces. A term written "re:PATTERN" is a regular expression,
also case-blind, that matches anywhere. Text and terms are NFKC-normalised first, so an accent typed as two code
points, or letters in their full-width form, match the plain term.
"""

from __future__ import annotations

import re
import unicodedata

from engine.config import TERM_REGEX_PREFIX, SafetyConfig
from engine.errors import UserError

SHOWN_LIMIT = 40  # characters of a found term repeated in the hint; a regex may match a long run of text


class BlockedTerms:
    def __init__(self, config: SafetyConfig) -> None:
        self._message = config.blocked_message
        self._words: list[str] = []  # in the order of the groups of `self._whole`
        self._patterns: list[re.Pattern[str]] = []
        for term in config.blocked_terms:
            if term.startswith(TERM_REGEX_PREFIX):
                self._patterns.append(re.compile(_normal(term.removeprefix(TERM_REGEX_PREFIX)), re.IGNORECASE))
            else:
                self._words.append(term.strip())
        # One pass for every word and phrase: a group each, so the match says which term it was. Lookarounds rather
        # than \b, so that a term beginning or ending with a sign ("c++") still needs a whole word around it.
        alternatives = "|".join(f"({_phrase(word)})" for word in self._words)
        self._whole = re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE) if self._words else None

    def find(self, text: str) -> str | None:
        """The blocked term that comes first in `text` (for a regex term, the text it matched), or None."""
        text = _normal(text)
        found: list[tuple[int, str]] = []
        if self._whole is not None and (match := self._whole.search(text)):
            assert match.lastindex is not None
            found.append((match.start(), self._words[match.lastindex - 1]))
        for pattern in self._patterns:
            if match := pattern.search(text):
                found.append((match.start(), match.group()))
        return min(found)[1] if found else None

    def check_prompt(self, *texts: str | None) -> None:
        """UserError with safety.blocked_message if any of `texts` (a prompt, a negative prompt) holds a blocked
        term; its hint names the term, so the user knows what to leave out."""
        for text in texts:
            if text and (term := self.find(text)):
                raise UserError(
                    self._message,
                    f"Your prompt holds {_shown(term)}, which this bot does not allow here. Ask again without it.",
                )


def _normal(text: str) -> str:
    return unicodedata.normalize("NFKC", text)


def _phrase(term: str) -> str:
    """A word or phrase as a pattern: its words in order, with any run of whitespace between them."""
    return r"\s+".join(re.escape(word) for word in _normal(term).split())


def _shown(term: str) -> str:
    term = " ".join(term.split())  # a regex may have matched across a line break
    return f'"{term}"' if len(term) <= SHOWN_LIMIT else f'"{term[: SHOWN_LIMIT - 1]}…"'
