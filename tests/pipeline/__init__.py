"""Tests of engine/pipeline: models, presets, the run, previews, the MP4."""
