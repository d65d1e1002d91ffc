"""Blocked terms: words and phrases matched whole and case-blind in any script, regex terms anywhere, and the user
told which term to leave out."""

from __future__ import annotations

import pytest

from engine.config import SafetyConfig
from engine.errors import UserError
from engine.safety.terms import BlockedTerms


def terms(*blocked: str, **overrides: object) -> BlockedTerms:
    return BlockedTerms(SafetyConfig.model_validate({"blocked_terms": list(blocked), **overrides}))


@pytest.mark.parametrize("text", ["gore", "Gore everywhere", "a scene full of GORE.", "(gore)", "blood,gore"])
def test_a_word_is_found_whole_in_any_case(text: str):
    assert terms("gore").find(text) == "gore"


@pytest.mark.parametrize("text", ["gorey", "an allegory", "gore_fest", "gore2", "Gorebag", ""])
def test_a_word_inside_a_longer_word_is_not_found(text: str):
    assert terms("gore").find(text) is None


def test_words_in_other_scripts_are_found_whole_and_case_blind():
    blocked = terms("Blut", "épée", "кровь")

    assert blocked.find("viel BLUT am Boden") == "Blut"
    assert blocked.find("une ÉPÉE brillante") == "épée"
    assert blocked.find("une E\u0301PE\u0301E, ses accents tapés en deux") == "épée"
    assert blocked.find("КРОВЬ на снегу") == "кровь"
    assert blocked.find("Blutwurst and épées and кровью") is None
    assert blocked.find("ｇｏｒｅ and ＢＬＵＴ") == "Blut"  # full-width letters are letters too


def test_a_phrase_matches_across_any_run_of_whitespace_and_only_whole():
    blocked = terms("blood bath")

    assert blocked.find("a Blood   bath at dawn") == "blood bath"
    assert blocked.find("a blood\n\tBATH") == "blood bath"
    assert blocked.find("a bloodbath") is None
    assert blocked.find("blood baths") is None
    assert blocked.find("blood, bath") is None


def test_a_term_that_begins_or_ends_with_a_sign_still_needs_a_whole_word():
    blocked = terms("c++", "#tag")

    assert blocked.find("code in C++") == "c++"
    assert blocked.find("c++ code") == "c++"
    assert blocked.find("c++x and abc++") is None
    assert blocked.find("a #TAG here") == "#tag"
    assert blocked.find("a#tag") is None


def test_a_regex_term_reports_the_text_it_matched_case_blind_and_anywhere():
    blocked = terms(r"re:nud(e|ity)", r"re:\bk+i+l+\b")

    assert blocked.find("artistic NUDITY") == "NUDITY"
    assert blocked.find("seminude") == "nude"  # a pattern is the operator's own: it matches where it says
    assert blocked.find("kkkiiilll them") == "kkkiiilll"
    assert blocked.find("a kiln") is None


def test_the_first_blocked_term_in_the_text_is_the_one_found():
    blocked = terms("gore", "re:bl(o)+d", "knife")

    assert blocked.find("a knife, blood and gore") == "knife"
    assert blocked.find("bloooood, then gore") == "bloooood"
    assert blocked.find("a quiet meadow") is None


def test_no_terms_find_nothing():
    assert terms().find("gore and blood") is None


def test_a_prompt_with_a_blocked_term_is_refused_naming_the_term():
    blocked = terms("gore", "re:dec[a@]pitat\\w*", blocked_message="Not here.")

    with pytest.raises(UserError) as raised:
        blocked.check_prompt("a cat", None, "lots of GORE")

    assert raised.value.message == "Not here."
    assert raised.value.hint == 'Your prompt holds "gore", which this bot does not allow here. Ask again without it.'
    with pytest.raises(UserError, match='holds "Dec@pitation"'):
        blocked.check_prompt("Dec@pitation scene")


def test_a_clean_prompt_passes():
    terms("gore").check_prompt("a ginger cat in the rain", None, "")


def test_a_long_regex_match_is_cut_short_in_the_hint():
    with pytest.raises(UserError) as raised:
        terms(r"re:x+").check_prompt("x" * 500)

    assert raised.value.hint.startswith(f'Your prompt holds "{"x" * 39}…",')
