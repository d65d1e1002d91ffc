"""One video on several devices: a worker made of N ranks that run the same pipeline under diffusers' context
parallelism (Ulysses), started and watched by the worker's own process (rank 0), which alone claims jobs, writes
outcomes, encodes and previews.

May import engine.config, engine.errors, engine.jobs, engine.pipeline, engine.hub and engine.storage; never the
queue, the facade or the worker loop (rank 0's worker drives it through the runner, the other ranks have no queue)."""
