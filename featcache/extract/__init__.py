"""The library side of ``featcache extract``: config, plan, per-shard worker, finalize.

The Ray driver that runs these is ``pipelines/extract.py``.
"""
