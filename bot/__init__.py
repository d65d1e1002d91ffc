"""Chat-facing side of wanbot: the command line and the platform adapters."""
