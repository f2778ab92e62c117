"""The extract job's configuration: a TOML or YAML file and/or command-line flags.

Every key is checked: an unknown key, a wrong type or an impossible value is a one-line
``UsageError`` naming it. The resolved config (file + flags + defaults) is what the run record
saves under ``runs/``. Example (YAML)::

    source: /data/photos            # anything `featcache index` takes, or an existing cache root
    output: s3://bucket/cache1
    teachers:
      - {preset: siglip2-g-384}
      - {family: dinov3, source: facebook/dinov3-vit7b16-pretrain-lvd1689m, resolutions: [224, 512],
         codec: int8-phis}
      - {preset: sam3, mosaic: 3}
    shard_size: 64
    batch_size: 16
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from featcache import configfile
from featcache.decode import DEFAULT_MAX_PIXELS
from featcache.errors import UsageError
from featcache.extract import pools
from featcache.extract.pools import POOL_MODES
from featcache.teachers.views import POLICIES
from featcache.store.codec import codec_named

DEVICES = ("auto", "cpu", "cuda")
DEFAULT_SHARD_SIZE = 64


@dataclass(frozen=True)
class TeacherConfig:
    """One teacher of the job and the views it produces (one per resolution, or one mosaic view)."""

    family: str
    source: str
    name: str | None = None  # the view-key prefix; the family by default
    revision: str | None = None
    resolutions: tuple[int, ...] = ()  # square input sizes; the teacher's native size when empty
    codec: str = "f16"  # how dense features are stored: f16, f32, int8-phis (PHI-S space, int8) or int4-pca (4-bit)
    mosaic: int = 1
    upsampler: str | None = None  # a `featcache featsharp train` checkpoint folder: one upsampled view

    def __post_init__(self):
        object.__setattr__(self, "resolutions", tuple(self.resolutions))
        where = f"teacher {self.name or self.family}"
        codec_named(self.codec, where)  # an unknown one: the registry's line, listing the known codecs
        if self.mosaic < 1:
            raise UsageError(f"{where}: mosaic must be >= 1, not {self.mosaic}")
        if self.mosaic > 1 and self.resolutions:
            raise UsageError(f"{where}: a mosaic view's size is the native size / mosaic; drop 'resolutions'")
        if any(r < 1 for r in self.resolutions) or len(set(self.resolutions)) != len(self.resolutions):
            raise UsageError(f"{where}: resolutions must be distinct positive sizes, not {list(self.resolutions)}")
        if self.upsampler is not None and (self.mosaic > 1 or self.resolutions):
            raise UsageError(f"{where}: an upsampled view's size is the upsampler's canvas; drop 'resolutions' and "
                             "'mosaic' (give the teacher again, with another 'name', for other views)")


@dataclass(frozen=True)
class ExtractConfig:
    source: str | None = None
    output: str | None = None
    teachers: tuple[TeacherConfig, ...] = ()
    view_policy: str = "squash"
    shard_size: int | None = None  # the cache's own when it has one, else DEFAULT_SHARD_SIZE
    batch_size: int = 16
    ray_address: str | None = None  # None: embedded local Ray; "auto" or "ray://host:port": a cluster
    device: str = "auto"  # auto: CUDA when the cluster has GPUs
    cpu_workers: int | None = None  # CPU actors; default 1 per node-sized share (see featcache.extract.scheduler.size_workers)
    threads_per_worker: int | None = None  # torch threads per CPU actor; default cores / workers
    workers_per_gpu: int = 1
    teacher_pools: str | list = "auto"  # auto, shared, separate, or lists of teacher names (featcache.extract.pools)
    compile: bool = False  # torch.compile each teacher's forward (short batches padded: one shape per view)
    decode_threads: int = 4
    max_retries: int = 3  # attempts after the first, per shard
    max_pixels: int = DEFAULT_MAX_PIXELS
    stats: bool = True  # PHI-S and dispersion of each fully committed view at the end
    recompute_stats: bool = False  # refit frozen statistics too (e.g. after the cache grew); int8-phis ones stay
    seed: int = 0  # the int8-phis calibration sample and the statistics' token sampling
    calibration_images: int = 256  # images an int8-phis view's PHI-S and scale are fitted on
    progress_interval: float = 10.0  # seconds between log lines when stderr is not a terminal
    repair: bool = False  # verify the job's views first; shards with problems are uncommitted and recomputed

    def __post_init__(self):
        object.__setattr__(self, "teachers", tuple(self.teachers))
        if self.view_policy not in POLICIES:
            raise UsageError(f"view_policy {self.view_policy!r} is not one of {', '.join(POLICIES)}")
        if self.device not in DEVICES:
            raise UsageError(f"device {self.device!r} is not one of {', '.join(DEVICES)}")
        for name in ("batch_size", "workers_per_gpu", "decode_threads", "max_pixels", "calibration_images"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name} must be >= 1, not {getattr(self, name)}")
        for name in ("shard_size", "cpu_workers", "threads_per_worker"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise UsageError(f"{name} must be >= 1, not {getattr(self, name)}")
        if self.seed < 0:
            raise UsageError(f"seed must be >= 0, not {self.seed}")
        if self.max_retries < 0:
            raise UsageError(f"max_retries must be >= 0, not {self.max_retries}")
        names = [v for t in self.teachers for v in [t.name or t.family]]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise UsageError(f"two teachers are named {dup[0]!r}: give one of them another 'name'")
        if isinstance(self.teacher_pools, str):
            if self.teacher_pools not in POOL_MODES:
                raise UsageError(f"teacher_pools {self.teacher_pools!r} is not one of {', '.join(POOL_MODES)}, "
                                 "nor a list of lists of teacher names")
        else:
            object.__setattr__(self, "teacher_pools", pools.check_named(self.teacher_pools, names))

    def checked(self) -> "ExtractConfig":
        """The config if it can run: an output root and at least one teacher."""
        if not self.output:
            raise UsageError("no output root: give 'output' in the config or --out")
        if not self.teachers:
            raise UsageError("no teachers: give 'teachers' in the config or --teacher")
        return self

    def to_dict(self) -> dict:
        """JSON-ready; the run record stores this (it never holds credentials: they come from the
        environment, never from the config)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


def load(path: str | None = None, **flags) -> ExtractConfig:
    """The config from ``path`` (TOML or YAML) with ``flags`` (those not None) on top."""
    data = configfile.read(path) if path else {}
    where = path or "flags"
    for key, value in flags.items():
        if value is not None and value != ():
            data[key] = value
    return from_dict(data, where)


def from_dict(data: dict, where: str = "config") -> ExtractConfig:
    if not isinstance(data, dict):
        raise UsageError(f"{where}: the config must be a mapping of keys to values")
    data = dict(data)
    teachers = data.pop("teachers", [])
    if isinstance(teachers, dict) or not isinstance(teachers, (list, tuple)):
        raise UsageError(f"{where}: 'teachers' must be a list of teacher entries")
    data["teachers"] = tuple(teacher_from_dict(t, f"{where}: teachers[{i}]") for i, t in enumerate(teachers))
    return _build(ExtractConfig, data, where)


def teacher_from_dict(d, where: str) -> TeacherConfig:
    if isinstance(d, TeacherConfig):
        return d
    if not isinstance(d, dict):
        raise UsageError(f"{where}: a teacher entry must be a mapping (family, source, ...), not {d!r}")
    d = dict(d)
    if "preset" in d:
        from featcache.teachers.presets import preset

        p = preset(str(d.pop("preset")))
        d.setdefault("family", p.family)
        d.setdefault("source", p.source)
    for key in ("family", "source"):
        if key not in d:
            raise UsageError(f"{where}: missing {key!r} (or give 'preset')")
    if "dtype" in d:
        raise UsageError(f"{where}: 'dtype' is now 'codec': f16 (float16), f32 (float32), int8-phis or int4-pca")
    if isinstance(d.get("resolutions"), int):
        d["resolutions"] = [d["resolutions"]]
    return _build(TeacherConfig, d, where)


def parse_teacher_flag(text: str) -> dict:
    """``--teacher family=dinov3,source=DIR,resolutions=224+512,mosaic=2`` (or ``preset=sam3,mosaic=3``)."""
    out: dict = {}
    for part in filter(None, text.split(",")):
        key, sep, value = part.partition("=")
        if not sep:
            raise UsageError(f"--teacher {text!r}: expected key=value pairs separated by commas, "
                             "e.g. family=dinov3,source=DIR,resolutions=224+512")
        key = key.strip()
        if key == "resolutions":
            out[key] = [_int(v, f"--teacher {key}") for v in value.split("+")]
        elif key == "mosaic":
            out[key] = _int(value, f"--teacher {key}")
        else:
            out[key] = value.strip()
    return out


def _int(text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise UsageError(f"{what}: {text!r} is not an integer") from None


def _build(cls, data: dict, where: str):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise UsageError(f"{where}: unknown key {unknown[0]!r}; known keys: {', '.join(fields)}")
    for key, value in data.items():
        data[key] = _coerce(value, fields[key], where)
    return cls(**data)


_TYPES = {"str": str, "int": int, "float": (int, float), "bool": bool, "dict": dict}


def _coerce(value, f: dataclasses.Field, where: str):
    """Check a value against the field's annotation (str / int / float / bool / tuple of int)."""
    kind = str(f.type)
    if value is None:
        if "None" in kind:
            return None
        raise UsageError(f"{where}: {f.name} cannot be empty")
    if f.name in ("teachers", "teacher_pools"):  # checked by the dataclass itself
        return value
    if "tuple[int" in kind:
        if not isinstance(value, (list, tuple)) or not all(_is(v, int) for v in value):
            raise UsageError(f"{where}: {f.name} must be a list of integers, not {value!r}")
        return tuple(value)
    base = kind.split("|")[0].strip()
    if not _is(value, _TYPES[base]):
        raise UsageError(f"{where}: {f.name} must be {'an' if base == 'int' else 'a'} {base}, not {value!r}")
    return float(value) if base == "float" else value


def _is(value, types) -> bool:
    if isinstance(value, bool) and types is not bool:
        return False
    return isinstance(value, types)
