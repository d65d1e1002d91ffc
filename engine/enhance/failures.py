"""Why an enhancement did not happen: a detail for the operator's log and one sentence for the user.

The user is told only that their own words were used and, in a few words, why; what to fix (the URL, the key, the
model) is the operator's and goes to the log."""

from __future__ import annotations

NOT_IN_TIME = "The prompt enhancer did not answer in time, so your own words were used."
UNAVAILABLE = "The prompt enhancer is not available right now, so your own words were used."
UNUSABLE = "The prompt enhancer's answer could not be used, so your own words were used."
EMPTY = "The prompt enhancer gave back no text, so your own words were used."
TOO_LONG = "The prompt enhancer's rewrite was too long, so your own words were used."


class EnhancerFailed(Exception):
    """An enhancement that failed: `str(error)` is the operator's detail (endpoint, status, model), `note` the
    sentence the user reads."""

    def __init__(self, detail: str, note: str) -> None:
        super().__init__(detail)
        self.note = note
