"""Content rules for public places: the terms a prompt may not hold (terms.py), and a picture classifier (an
image-classification model in this process, classifier.py; tiny.py builds a random stand-in that always answers one
label, for tests) that checks the start and end pictures before a job is queued and a few frames of each video
before it is sent. What a flagged picture means where it would be shown (block, spoiler, allow) is the caller's.

May import: engine.config, engine.errors, engine.hub (downloads), engine.storage (atomic folders). Never engine.queue,
engine.pipeline, engine.service, engine.operator, engine.worker, engine.metrics or bot.
"""
