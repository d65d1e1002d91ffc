"""Platform-neutral core of wanbot: validation, queue, models, generation and delivery helpers."""
