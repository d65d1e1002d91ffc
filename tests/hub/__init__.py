"""Tests of engine/hub: the downloader against a fake Hub on loopback, the Hugging Face cache."""
