"""Benchmarks run from a checkout that is not installed (a lent GPU machine: torch and transformers, no
zarr, Ray or s3fs, and no ``pip install`` of featcache).

``featcache`` itself imports from the checkout (its cache API loads on first use); what an installed
package adds is the mapping of ``train/`` and ``pipelines/`` to ``featcache.train`` and
``featcache.pipelines`` (pyproject's package-dir). :func:`use_checkout` registers that mapping when
it is missing, so ``from featcache.train.student import ...`` works in both places.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def use_checkout() -> None:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    for name, folder in (("featcache.train", "train"), ("featcache.pipelines", "pipelines")):
        if name in sys.modules or importlib.util.find_spec(name) is not None:
            continue
        spec = importlib.util.spec_from_file_location(name, ROOT / folder / "__init__.py",
                                                      submodule_search_locations=[str(ROOT / folder)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)


def python_command(script: str | Path, *args: str) -> list[str]:
    """The command that runs ``script`` with ``args`` as this process was started: the same interpreter with
    the same options before the script (``-X ...``, or the ``-c`` of a harness that runs it through runpy, as
    tests/test_packaging.py does), so a benchmark's helper processes run where and how it runs."""
    before = sys.orig_argv[1:len(sys.orig_argv) - len(sys.argv)]
    if before[-1:] == ["-m"]:  # started as ``python -m benchmarks.x``: run the file instead
        before = before[:-1]
    return [sys.executable, *before, str(script), *args]
