"""The library side of ``featcache extract``: config, plan, view kinds, the job and its scheduler,
the executor interface, per-shard worker, finalize.

``pipelines/extract.py`` runs the workers as Ray actors through that interface.
"""
