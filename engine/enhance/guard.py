"""The guard that a rewrite keeps what the user asked for.

An instruct model told to keep every subject, name, number and colour still drops one now and then, or swaps a name
for a description; the video then shows something else than was asked. The rule, cheap and predictable:

- The user's key words are every number (digits, as written: "3", "2.5") and, when the rewrite keeps the user's
  language, every word of four letters or more that is not a common English function word ("with", "that",
  "video"...). A word is a run of letters; runs holding kana or CJK ideographs are left out, since those scripts
  write no spaces and such a "word" is a whole clause. In English mode only numbers are checked: translation
  changes every word.
- A key word is kept if the rewrite contains it, ignoring case, anywhere ("cat" in "cats", "Whiskers" in
  "Whiskers'"); a number only as a whole number ("3" not in "30").
- If one is missing, the user's own prompt is put in front of the rewrite. In front, not behind: Wan's text encoder
  reads 512 tokens and cuts the rest, and what it cuts must be the added detail, never the user's words.
"""

from __future__ import annotations

import re

from engine.enhance.instructions import Language

KEY = re.compile(r"(?P<number>\d+(?:[.,]\d+)?)|(?P<word>[^\W\d_]{4,})")  # a number, or a word of 4+ letters
UNSPACED = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")  # kana and CJK ideographs
# Words a faithful rewrite may well drop or rephrase: grammar, and the words of asking for a video.
_COMMON = """
    about also been being both could does doing each either every from have having here into just like more most
    much only onto other same should some such than that their them then there these they this those very were what
    when where which while will with would your yours please want make makes made show shows create generate video
    clip scene
    """
COMMON = frozenset(_COMMON.split())


def missing_words(original: str, rewrite: str, language: Language) -> list[str]:
    """The user's key words (see the module's rule) that the rewrite lacks, in the order the user wrote them."""
    folded = rewrite.casefold()
    lost = []
    for key in KEY.finditer(original):
        if number := key["number"]:
            kept = re.search(rf"(?<!\d){re.escape(number)}(?!\d)", rewrite) is not None
        else:
            word = key["word"].casefold()
            kept = language != "keep" or UNSPACED.search(word) is not None or word in COMMON or word in folded
        if not kept:
            lost.append(key[0])
    return list(dict.fromkeys(lost))


def with_user_words(original: str, rewrite: str) -> str:
    """The rewrite with the user's prompt in front of it."""
    return f"{original.strip()} {rewrite}"
