"""The prompt enhancer: a user's short prompt rewritten into the detailed one Wan was trained on, by an
OpenAI-compatible endpoint (openai_client.py) or a small instruct model in this process (local.py; tiny.py builds a
random stand-in for tests and benchmarks), with the instructions it is given (instructions.py) and the guard that the
user's own words survive the rewrite (guard.py). enhancer.py is the facade: it never fails a request, it falls back
to the user's words with a note instead.

May import: engine.config, engine.errors, engine.hub (downloads), engine.storage (atomic files). Never engine.queue,
engine.pipeline, engine.service, engine.operator, engine.worker, engine.metrics or bot.
"""
