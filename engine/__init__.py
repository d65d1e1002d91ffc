"""Platform-neutral core of wanbot: validation, queue, models, generation and delivery helpers."""

import logging


class _DropTorchvisionNotice(logging.Filter):
    """Wan 2.2 pipelines have no CLIP image encoder, so transformers' notice that its CLIP image processor falls back
    to PIL (torchvision is left out on purpose) would only alarm users on every start."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed)" not in record.getMessage()


logging.getLogger("transformers.utils.import_utils").addFilter(_DropTorchvisionNotice())
