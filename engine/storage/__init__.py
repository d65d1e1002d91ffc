"""Files that outlive a job: pictures checked and stored content-addressed (images.py), atomic writes (files.py),
pictures, videos and previews shared through the database when processes sit on several machines (shared_files.py),
and the clean-up of what no job needs any more (cleanup.py).

May import: engine.config, engine.errors, engine.jobs, and the queue's database for shared files and clean-up. Never
engine.pipeline or bot.
"""
