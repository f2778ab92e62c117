"""Student training from the cache (DESIGN.md §5): ``featcache train`` and its Python API.

    from featcache.train import config, train, load_student
    run = train(config.load("train.toml", cache="cache/"), "runs/r1")
    student = load_student("runs/r1")      # the trained featcache.train.student.Student, in eval mode

The training process never imports or builds a teacher: every target is read from the cache.
"""

from featcache.train import config
from featcache.train.loop import TrainResult, load_student, train

__all__ = ["TrainResult", "config", "load_student", "train"]
