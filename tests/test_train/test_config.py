"""A run's config refuses, in one line naming the key, every value it could not train with: a value of
the wrong type (each override is checked against its field's type) and a number out of its range."""

from __future__ import annotations

import pytest

from featcache.errors import UsageError
from featcache.train import config

TEACHERS = 'teachers=[{name="a", low="a@64"}]'


@pytest.mark.parametrize("override, message", [
    ("optim.steps=five", "config [optim]: steps = 'five' is not an int"),
    ('optim.lr="fast"', "config [optim]: lr = 'fast' is not a float"),
    ("seed=1.5", "config: seed = 1.5 is not an int"),
    ("optim.betas=[0.9, true]", "config [optim]: betas = [0.9, True] is not a list of float"),
    ("eval.knn_teacher=3", "config [eval]: knn_teacher = 3 is not a str or none"),
    ("eval.pictures=1", "config [eval]: pictures = 1 is not a bool"),
    ("teachers=[{name='a', low='a@64', spatial='x'}]", "[[teachers]] #1: spatial = 'x' is not a float"),
    ("optim.lr=-1", "optim.lr must be > 0, not -1"),
    ("eval.every=0", "eval.every must be >= 1, not 0"),
    ("checkpoint_every=0", "checkpoint_every must be >= 1, not 0"),
    ("log_every=0", "log_every must be >= 1, not 0"),
    ("eval.resolution=0", "eval.resolution must be >= 1, not 0"),
    ("data.workers=-1", "data.workers must be >= 0, not -1"),
    ("seed=-1", "seed must be >= 0, not -1"),
    ("loss.ema_decay=2", "loss.ema_decay must be in [0, 1]"),
])
def test_a_value_the_run_cannot_use_is_named(override, message):
    with pytest.raises(UsageError) as e:
        config.load(None, cache="c", overrides=[TEACHERS, override])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_an_int_where_a_float_goes_and_a_list_where_a_tuple_goes_are_accepted():
    cfg = config.load(None, cache="c", overrides=[TEACHERS, "optim.lr=1", "crop.scale=[0.5, 1]", "seed=7"])
    assert cfg.optim.lr == 1 and cfg.crop.scale == (0.5, 1) and cfg.seed == 7
