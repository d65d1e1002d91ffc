"""The model libraries' own chatter: their progress bars and INFO lines ("Loading weights", "Writing model shards")
would run between wanbot's log lines and its progress display, and repeat what they already say."""

from __future__ import annotations


def quiet_libraries() -> None:
    """Turn off diffusers', transformers' and huggingface_hub's progress bars and their lines below ERROR."""
    from diffusers.utils import logging as diffusers_logging
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as transformers_logging

    for library in (diffusers_logging, transformers_logging):
        library.disable_progress_bar()
        library.set_verbosity_error()
    disable_progress_bars()
