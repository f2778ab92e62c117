"""A cache to train from: real photos, three tiny teachers (the real transformers classes), stats.

Built without Ray (``ShardWorker`` and ``compute_view`` are the per-shard library functions the Ray
jobs call), so a training test pays for the teachers once and for no cluster start-up.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import featcache
from featcache.extract.config import from_dict
from featcache.extract.plan import prepare
from featcache.extract.worker import ShardWorker
from featcache.stats.compute import compute_view
from featcache.store.cache import Cache
from tests.support.images import skimage_photos
from tests.support.teachers import save_dinov3, save_sam3_video_layout, save_siglip


#: The run configs' two teachers over the training cache's views (TOML, for a config file).
TWO_TEACHERS = """[[teachers]]
name = "siglip2"
low = "siglip2@64"

[[teachers]]
name = "dinov3"
low = "dinov3@64"
high = "dinov3@128"
"""


def teachers(folder: Path) -> dict[str, str]:
    return {"siglip2": str(save_siglip(folder / "siglip2")[0]), "dinov3": str(save_dinov3(folder / "dinov3")[0]),
            "sam3": str(save_sam3_video_layout(folder / "sam3")[0])}


def build(root: Path, source: str | Path, models: dict[str, str], shard_size: int = 8) -> Cache:
    """Index ``source`` into ``root`` and extract siglip2@64, dinov3@64, dinov3@128 and sam3-mosaic2@56 (f16)."""
    featcache.index(str(source), str(root))
    job = from_dict({"source": str(root), "output": str(root), "shard_size": shard_size, "batch_size": 8,
                     "teachers": [{"family": "siglip2", "source": models["siglip2"]},
                                  {"family": "dinov3", "source": models["dinov3"], "resolutions": [64, 128]},
                                  {"family": "sam3", "source": models["sam3"], "mosaic": 2}]}, "training cache")
    plan = prepare(job)
    worker = ShardWorker(str(root), [t.to_dict() for t in plan.teachers], [v.to_dict() for v in plan.views])
    for shard in sorted(plan.todo):
        worker.process(shard)
    worker.close()
    cache = Cache.open(str(root))
    for view in cache.views.values():
        compute_view(view)
    return Cache.open(str(root))


def photos(folder: Path) -> Path:
    """The scikit-image photos (26 of them) copied into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for path in skimage_photos():
        shutil.copyfile(path, folder / Path(path).name)
    return folder
