"""Student training from the cache (DESIGN.md §5): ``featcache train`` and its Python API.

    from featcache.train import config, train, load_student
    run = train(config.load("train.toml", cache="cache/"), "runs/r1")
    student = load_student("runs/r1")      # the student as a product (DESIGN.md §8), in eval mode:
    out = student(image)                   # {teacher: {"summary", "dense"}} in each teacher's space

``featcache.train.weights.load_bare_student`` gives the bare ``featcache.train.student.Student`` (what
``--init`` starts from). The training process never imports or builds a teacher: every target is read
from the cache.
"""

__all__ = ["TrainResult", "config", "export", "load_student", "train"]


def __getattr__(name: str):
    """The loop and the product (they read caches: zarr) on first use; the student, losses and geometry
    import without them."""
    if name in ("TrainResult", "train"):
        from featcache.train import loop

        return getattr(loop, name)
    if name in ("load_student", "export"):
        from featcache.train import product

        return getattr(product, name)
    raise AttributeError(f"module 'featcache.train' has no attribute {name!r}")
