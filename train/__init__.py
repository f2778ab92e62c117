"""Student training from the cache (DESIGN.md §5): ``featcache train`` and its Python API.

    from featcache.train import config, train, load_student
    run = train(config.load("train.toml", cache="cache/"), "runs/r1")
    student = load_student("runs/r1")      # the trained featcache.train.student.Student, in eval mode

The training process never imports or builds a teacher: every target is read from the cache.
"""

__all__ = ["TrainResult", "config", "load_student", "train"]


def __getattr__(name: str):
    """The loop (it reads caches: zarr) on first use; the student, losses and geometry import without it."""
    if name in ("TrainResult", "load_student", "train"):
        from featcache.train import loop

        return getattr(loop, name)
    raise AttributeError(f"module 'featcache.train' has no attribute {name!r}")
