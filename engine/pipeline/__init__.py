"""Loading, placing and running a Wan pipeline: the models and presets a request resolves to (models.py,
presets.py), where the weights come from (weights.py, loras.py), how the pipeline is placed and sped up
(speedups.py, samplers.py, passes.py), the run itself with its progress and live previews (generate.py,
previews.py), prompt lengths (prompts.py), the MP4 (video.py) and the tiny offline models (tiny.py).

models.py and presets.py are records and rules the chat side may read; everything else imports torch and is loaded
only in a process that makes videos. May import: engine.config, engine.errors, engine.jobs, engine.storage,
engine.hub. Never engine.queue or bot.
"""
