"""The teacher interface and registry: one family per file, ``create_teacher`` the only constructor.

A teacher wraps a transformers vision model and returns a fixed structure, ``summary (B, Cs)``
and ``dense (B, h, w, C)``, float32 unless the caller asks for the forward's own dtypes, from a batch
of normalized views (see :mod:`featcache.teachers.views`). On CUDA the weights are loaded in bfloat16
(never as a float32 copy), attention is SDPA, the forward runs under bf16 autocast (norms and
softmax in float32, as autocast decides) and a batch that runs out of memory is split in halves
until it fits; on CPU everything is float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from featcache.errors import UsageError
from featcache.registry import Registry
from featcache.roofline import VitShape
from featcache.teachers import loading
from featcache.teachers.spec import TeacherSpec

_FAMILIES: Registry[type["Teacher"]] = Registry("teacher family", "unknown {kind} {name}; known families: {known}")


def register(cls: type["Teacher"]) -> type["Teacher"]:
    """Class decorator: add a family to the registry (a duplicate name is an error)."""
    return _FAMILIES.add(cls.family, cls)


def families() -> list[str]:
    return _FAMILIES.names()


def family_class(name: str) -> type["Teacher"]:
    return _FAMILIES.get(name)


@dataclass(frozen=True)
class ModelSetup:
    """How a family builds its transformers model from a checkpoint directory."""

    model_cls: type
    config: object  # a transformers PretrainedConfig
    key_mapping: dict[str, str] | None = None
    ignorable: tuple[str, ...] = ()  # regexes of checkpoint keys the family may leave unused


@dataclass(frozen=True)
class TeacherOutput:
    """What every teacher returns: one summary vector and one dense patch map per view."""

    summary: torch.Tensor  # (B, Cs) float32 (or the forward's dtype, when asked for)
    dense: torch.Tensor  # (B, h, w, C) float32 (or the forward's dtype, when asked for)


class Teacher:
    """A loaded teacher: model, spec and device. Subclasses implement ``load`` and ``_forward``."""

    family: ClassVar[str]
    #: model_type values in config.json that this family loads.
    model_types: ClassVar[tuple[str, ...]]

    def __init__(self, model: torch.nn.Module, spec: TeacherSpec, device: str | torch.device = "cpu",
                 compile: bool = False):
        self.spec = spec
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self._call = torch.compile(self._forward) if compile else self._forward
        self.compiled = compile
        #: the largest batch known to fit; lowered for good after an out-of-memory back-off
        self.batch_size: int | None = None

    @classmethod
    def load(cls, source: str, revision: str | None = None, device: str = "cpu", compile: bool = False,
             name: str | None = None, hash_weights: bool = True) -> "Teacher":
        """Load from a HF id or a local directory, with every weight checked (see ``loading``)."""
        directory, config = cls._open(source, revision)
        setup = cls._model_setup(directory, config)
        model = loading.load_checked(setup.model_cls, directory, setup.config, key_mapping=setup.key_mapping,
                                     ignorable=setup.ignorable, dtype=weights_dtype(device))
        spec = cls._spec(model, directory, config, source, revision, name, hash_weights)
        return cls(model, spec, device=device, compile=compile)

    @classmethod
    def describe(cls, source: str, revision: str | None = None, name: str | None = None,
                 hash_weights: bool = True) -> TeacherSpec:
        """The spec ``load`` would give, from the config alone: the model is built on the meta
        device (no memory, no weights read), so a driver can plan views without loading it."""
        model, directory, config = cls._meta_model(source, revision)
        return cls._spec(model, directory, config, source, revision, name, hash_weights)

    @classmethod
    def parameter_count(cls, source: str, revision: str | None = None) -> int:
        """How many weights the model has, from its config alone (built on the meta device)."""
        model, _, _ = cls._meta_model(source, revision)
        return sum(p.numel() for p in model.parameters())

    @classmethod
    def vit_shape(cls, source: str, revision: str | None = None, prefix_tokens: int = 0) -> VitShape:
        """The backbone as ``featcache.roofline`` models it, read from the model's config: width, MLP,
        blocks, patch; a gated MLP (DINOv3); windows (SAM3: window_size tokens per side, the blocks of
        ``global_attn_indexes`` global); SigLIP's attention-pooling head."""
        directory, config = cls._open(source, revision)
        c = cls._model_setup(directory, config).config
        ws, globals_ = getattr(c, "window_size", 0) or 0, list(getattr(c, "global_attn_indexes", None) or [])
        return VitShape(c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.patch_size,
                        gated=bool(getattr(c, "use_gated_mlp", False)), prefix_tokens=prefix_tokens,
                        window=ws * ws if ws else None, global_layers=len(globals_) if ws else 0,
                        pool_head=bool(getattr(c, "vision_use_head", False)))

    @classmethod
    def _meta_model(cls, source: str, revision: str | None) -> tuple[torch.nn.Module, str, dict]:
        directory, config = cls._open(source, revision)
        setup = cls._model_setup(directory, config)
        with torch.device("meta"):
            build = getattr(setup.model_cls, "from_config", None) or setup.model_cls
            return build(setup.config), directory, config

    @classmethod
    def _open(cls, source: str, revision: str | None) -> tuple[str, dict]:
        directory = loading.resolve_source(source, revision)
        config = loading.read_config(directory)
        cls.check_model_type(config, directory)
        return directory, config

    @classmethod
    def _spec(cls, model, directory, config, source, revision, name, hash_weights) -> TeacherSpec:
        digest = loading.weights_hash(directory) if hash_weights else None
        return TeacherSpec(family=cls.family, name=name or cls.family, source=source, revision=revision,
                           weights_hash=digest, model_type=config["model_type"], **cls._spec_fields(model, directory))

    @classmethod
    def check_model_type(cls, config: dict, directory: str) -> None:
        """Refuse a directory holding a model this family does not load."""
        loading.check_model_type(config, cls.model_types, cls.family, directory)

    @classmethod
    def _model_setup(cls, directory: str, config: dict) -> "ModelSetup":
        """Which transformers class and config build this family's model, and how its weights map."""
        raise NotImplementedError

    @classmethod
    def _spec_fields(cls, model: torch.nn.Module, directory: str) -> dict:
        """The family's TeacherSpec fields derived from the loaded model's config."""
        raise NotImplementedError

    def _forward(self, pixels: torch.Tensor) -> TeacherOutput:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec.source!r}, {self.spec.view_key()}, device={self.device})"

    @torch.inference_mode()
    def extract(self, pixels: torch.Tensor, batch_size: int | None = None,
                dtype: torch.dtype | None = torch.float32) -> TeacherOutput:
        """Features of a batch of normalized views ``(B, 3, H, W)`` on this teacher's device.

        ``dtype``: of the outputs; ``None`` keeps what the forward gives (on CUDA bfloat16, or float32
        where autocast ran the last op, a final norm, in float32), for a caller that converts them to
        a stored dtype on the device and never copies float32 to the host."""
        self.spec.check_size(tuple(pixels.shape[-2:]))
        pixels = pixels.to(self.device, non_blocking=True)
        size = min(batch_size or len(pixels), self.batch_size or len(pixels))
        out, used = run_in_batches(lambda p, n: self._run(p, dtype, n), pixels, size, backoff=self.device.type == "cuda")
        if used < size:
            self.batch_size = used
        return out

    @torch.inference_mode()
    def extract_mosaic(self, tiles: torch.Tensor, k: int, batch_size: int | None = None,
                       dtype: torch.dtype | None = torch.float32) -> TeacherOutput:
        """Features of ``(B, 3, t, t)`` tiles, ``k`` x ``k`` of them composed into each native-size input.

        Tiles fill each mosaic row-major; a last, partly filled mosaic is padded with zeros (the
        normalized mean colour). Each tile gets back its own ``(t/p, t/p)`` cells of the mosaic's
        dense map, and as summary the mean of those cells (a pooled head or CLS token sees the whole
        mosaic, so it describes no single tile). ``batch_size`` counts mosaics; ``dtype`` as in
        :meth:`extract` (the mean is taken in float32, and kept so when ``dtype`` is None).
        """
        th, tw = self.spec.mosaic_tile(k)
        if tuple(tiles.shape[-2:]) != (th, tw):
            raise UsageError(f"{self.spec.name}: a {k}x{k} mosaic takes {th}x{tw} tiles, not "
                             f"{tiles.shape[-2]}x{tiles.shape[-1]}")
        n, per = len(tiles), k * k
        m = -(-n // per)
        canvas = tiles.new_zeros((m * per, 3, th, tw))
        canvas[:n] = tiles
        mosaics = canvas.view(m, k, k, 3, th, tw).permute(0, 3, 1, 4, 2, 5).reshape(m, 3, k * th, k * tw)
        dense = self.extract(mosaics, batch_size, dtype=None).dense
        gh, gw = th // self.spec.patch_size, tw // self.spec.patch_size
        dense = dense.reshape(m, k, gh, k, gw, -1).permute(0, 1, 3, 2, 4, 5).reshape(m * per, gh, gw, -1)[:n]
        summary = dense.mean(dim=(1, 2), dtype=torch.float32)  # stays float32 with dtype None: no bf16 rounding
        return TeacherOutput(summary.to(dtype or summary.dtype), dense.to(dtype or dense.dtype))

    def _run(self, pixels: torch.Tensor, dtype: torch.dtype | None = torch.float32,
             batch_size: int | None = None) -> TeacherOutput:
        """One forward; a compiled teacher pads a short batch with zeros to ``batch_size`` (the
        outputs of the padding are dropped) and copies every batch (an inference-mode tensor
        whatever the caller's was) so that its guards always pass: it is never recompiled."""
        n = len(pixels)
        if self.compiled:
            pad = max(0, (batch_size or n) - n)
            pixels = torch.cat([pixels, pixels.new_zeros((pad, *pixels.shape[1:]))])
        if self.device.type == "cuda":
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = self._call(pixels)
        else:
            out = self._call(pixels.float())
        if len(out.dense) != n:
            out = TeacherOutput(out.summary[:n], out.dense[:n])
        if dtype is None:
            return out
        return TeacherOutput(out.summary.to(dtype), out.dense.to(dtype))

    def tokens_to_grid(self, tokens: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Patch tokens ``(B, prefix + h*w, C)`` → dense ``(B, h, w, C)``, prefix tokens dropped."""
        h, w = self.spec.grid(size)
        patches = tokens[:, self.spec.prefix_tokens:]
        if patches.shape[1] != h * w:
            raise RuntimeError(f"{self.spec.name}: {patches.shape[1]} patch tokens for a {h}x{w} grid")
        return patches.reshape(len(tokens), h, w, tokens.shape[-1])


def run_in_batches(run, pixels: torch.Tensor, size: int, backoff: bool) -> tuple[TeacherOutput, int]:
    """``run(batch, size)`` over ``pixels`` in batches of ``size`` (the last one may be shorter); on
    out-of-memory (with ``backoff``) halve the batch and redo the whole input. Returns the output
    and the batch size that worked."""
    while True:
        try:
            return _concat([run(pixels[i:i + size], size) for i in range(0, len(pixels), size)]), size
        except torch.OutOfMemoryError:
            if size == 1 or not backoff:
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            size = max(1, size // 2)


def _concat(outs: list[TeacherOutput]) -> TeacherOutput:
    if len(outs) == 1:
        return outs[0]
    return TeacherOutput(torch.cat([o.summary for o in outs]), torch.cat([o.dense for o in outs]))


def weights_dtype(device: str | torch.device) -> torch.dtype:
    """The dtype a teacher's weights are loaded in: bfloat16 on CUDA, float32 elsewhere (CPUs have
    no fast bf16 path here, and tests compare float32 outputs)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def describe_teacher(family: str, source: str, revision: str | None = None, name: str | None = None,
                     hash_weights: bool = True) -> TeacherSpec:
    """The spec of a teacher without loading its weights (see ``Teacher.describe``)."""
    return family_class(family).describe(source, revision=revision, name=name, hash_weights=hash_weights)


def teacher_shape(family: str, source: str, revision: str | None = None, prefix_tokens: int = 0) -> VitShape:
    """A teacher's backbone for the roofline, from its config (see ``Teacher.vit_shape``)."""
    return family_class(family).vit_shape(source, revision=revision, prefix_tokens=prefix_tokens)


def teacher_parameters(family: str, source: str, revision: str | None = None) -> int:
    """How many weights a teacher has, without loading them (see ``Teacher.parameter_count``)."""
    return family_class(family).parameter_count(source, revision=revision)


def create_teacher(family: str, source: str, revision: str | None = None, **overrides) -> Teacher:
    """Load a teacher of ``family`` from a HF id or a local directory.

    ``overrides``: ``device``, ``compile``, ``name`` (the view-key prefix), ``hash_weights``.
    """
    return family_class(family).load(source, revision=revision, **overrides)
