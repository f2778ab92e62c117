"""The ``featcache`` command line: a thin typer layer over the library functions.

Exit codes: 0 all good; 1 the command ran but found failures (images that could not be used,
problems in a cache); 2 the arguments or config cannot be used (one line on stderr, no traceback).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Optional

import functools

import typer

import featcache
from featcache.errors import FeatcacheError, UsageError
from featcache.log import configure_cli
from featcache.store.location import check_reachable
from featcache.retry import storage_error

# rich_markup_mode=None: help text is plain text, so "[64]" and "[default: ...]" are shown, not eaten as markup.
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="Run vision teachers once over an image dataset and cache what they see.")


def user_errors(fn):
    """Report a FeatcacheError as one line on stderr and exit with its code (2; 1 for storage that
    refuses a write), no traceback. An OSError of a full, read-only or forbidden location that no
    library call named (``StorageError``) is reported the same way; any other error keeps its traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except FeatcacheError as e:
            typer.echo(f"featcache: error: {e}", err=True)
            raise typer.Exit(e.exit_code) from None
        except OSError as e:
            error = storage_error(e, f"writing {e.filename}" if e.filename else "writing the output")
            if error is None:
                raise
            typer.echo(f"featcache: error: {error}", err=True)
            raise typer.Exit(error.exit_code) from None

    return wrapper


def _version(value: bool) -> None:
    if value:
        typer.echo(f"featcache {featcache.__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Optional[bool] = typer.Option(None, "--version", callback=_version, is_eager=True,
                                                 help="Print the version and exit."),
          quiet: bool = typer.Option(False, "--quiet", "-q", help="Only warnings and errors on stderr "
                                                                  "(no progress, no log lines)."),
          verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug messages too.")) -> None:
    """featcache: extract, store and reuse teacher features."""
    if quiet and verbose:
        raise typer.BadParameter("--quiet and --verbose exclude each other")
    configure_cli(quiet=quiet, verbose=verbose)


@app.command("index")
@user_errors
def index_cmd(
    src: str = typer.Argument(..., help="Folder or glob (local or fsspec URL such as s3://b/p), "
                                        "or a .parquet/.csv list with a 'uri' column, or webdataset tar "
                                        "shards or Parquet image tables: a file, a glob or a brace "
                                        "pattern ('s3://b/shards/{00000..00099}.tar')."),
    out: str = typer.Option(..., "--out", "-o", help="Cache root to write manifest.parquet into."),
    workers: Optional[int] = typer.Option(None, min=1, help="Threads reading image headers or tars "
                                                            "[default: 1 for local files, 16 for remote]."),
    image_column: Optional[str] = typer.Option(None, "--image-column", help="Parquet image tables: the column "
                                               "of images (binary, or struct<bytes, path>) [default: the only "
                                               "such column]."),
    image_ext: Optional[list[str]] = typer.Option(None, "--image-ext", help="webdataset tars: the sample "
                                                  "fields that are images (a sample's first such member is "
                                                  "its image), e.g. 'jpg,png' [default: every image extension]."),
) -> None:
    """Write ROOT/manifest.parquet: one row per image with its size, read from headers only."""
    result = featcache.index(src, out, workers=workers, image_column=image_column, image_ext=image_ext)
    from featcache.extract.progress import plural

    typer.echo(f"indexed {plural(result.images, 'image')} into {result.root} "
               f"({result.files_per_second:.0f} files/s)")
    if result.ignored:
        typer.echo(f"ignored {plural(len(result.ignored), 'file')} (not images; listed in errors.parquet)")
    if result.failed:
        for uri, reason in result.failed[:10]:
            typer.echo(f"  failed: {uri}: {reason}", err=True)
        typer.echo(f"{plural(len(result.failed), 'file')} could not be indexed (reasons in errors.parquet)", err=True)
        raise typer.Exit(1)


@app.command("inspect")
@user_errors
def inspect_cmd(
    root: str = typer.Argument(..., help="Cache root (local directory or fsspec URL)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="As 'featcache -q inspect': only warnings and "
                                                            "errors on stderr."),
) -> None:
    """Show what a cache holds: images, views, shapes, dtypes, bytes, commits, errors, statistics."""
    if quiet is True:  # not its typer default: demo calls this function directly
        configure_cli(quiet=True)
    check_reachable(root)
    info = featcache.inspect(root)
    if as_json:
        typer.echo(json.dumps(info, indent=1, sort_keys=True))
        return
    typer.echo(_inspect_text(info))


def _inspect_text(info: dict) -> str:
    from featcache.store.codec import codec_from_attrs

    lines = [f"cache {info['root']}: {info['images']} images, shard size {info['shard_size'] or '-'}, "
             f"{info['errors']['total']} errors {info['errors']['by_stage'] or ''}".rstrip()]
    if not info["views"]:
        lines.append("  no views yet (run 'featcache extract')")
    lines += [f"  note: features.zarr/{name}: a folder that is not a view (left alone)" for name in info["not_views"]]
    for key, v in info["views"].items():
        dense = v["arrays"]["dense"]
        codec = codec_from_attrs(v).describe()  # e.g. "int8-phis (scale 0.0123)"
        codec += f", {v['token_bytes']} B/token" if "token_bytes" in v else ""
        lines.append(f"  {key:28s} dense {tuple(dense['shape'])} {codec}  summary "
                     f"{tuple(v['arrays']['summary']['shape'])}  shards {v['shards']['committed']}/"
                     f"{v['shards']['total']}  {_human(v['bytes_stored'])}  stats {'yes' if v['stats'] else 'no'}")
    return "\n".join(lines)


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


@app.command("verify")
@user_errors
def verify_cmd(
    root: str = typer.Argument(..., help="Cache root (local directory or fsspec URL)."),
    view: Optional[list[str]] = typer.Option(None, "--view", help="Only these views (repeatable)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (ok, format, problems, notes)."),
) -> None:
    """Check every committed shard: checksums, no NaN/Inf, valid vs commits and errors, shapes."""
    check_reachable(root)
    report = featcache.verify(root, views=view)
    if as_json:
        from featcache.store.inspect import format_version

        typer.echo(json.dumps({**report.to_dict(), "format": format_version(featcache.open_cache(root))},
                              indent=1, sort_keys=True))
        raise typer.Exit(0 if report.ok else 1)
    for note in report.notes:
        typer.echo(f"note: {note}")
    if report.ok:
        typer.echo(f"ok: {report.shards_checked} committed shards verified")
        return
    for problem in report.problems:
        typer.echo(f"problem: {problem}", err=True)
    typer.echo(f"{len(report.problems)} problems in {report.shards_checked} committed shards", err=True)
    raise typer.Exit(1)


@app.command("teachers")
@user_errors
def teachers_cmd() -> None:
    """List the teacher presets: parameters, FLOPs per image at native size, stored bytes per image."""
    from featcache.teachers.presets import PRESETS

    typer.echo(f"{'preset':15s} {'family':8s} {'params':>9s} {'input':>6s} {'grid':>6s} {'TFLOP/img':>10s} "
               f"{'stored/img':>11s}  source")
    for p in PRESETS.values():
        params = sum(t.numel() for t in p.build_meta().parameters())
        typer.echo(f"{p.name:15s} {p.family:8s} {_count(params):>9s} {p.size:>6d} {p.grid:>3d}x{p.grid:<2d} "
                   f"{p.flops() / 1e12:>10.2f} {_human(p.stored_bytes()):>11s}  {p.source}")


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.0f} M"


@app.command("extract")
@user_errors
def extract_cmd(
    config: Optional[str] = typer.Argument(None, help="Job config file (.toml, .yaml); flags override it."),
    source: Optional[str] = typer.Option(None, "--source", "-s", help="Images (anything 'index' takes) or a "
                                                                       "cache root whose manifest to use."),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="Cache root (local directory or s3://...)."),
    teacher: Optional[list[str]] = typer.Option(
        None, "--teacher", "-t", help="Repeatable: family=F,source=DIR_OR_HF_ID or preset=P, then any of "
                                      "[,resolutions=224+512] [,mosaic=K] [,codec=f32|int8-phis|int4-pca] [,name=N] "
                                      "[,revision=REV] [,upsampler=DIR] (DIR: a `featcache featsharp train` "
                                      "checkpoint; one upsampled view), written without spaces, e.g. "
                                      "preset=sam3,mosaic=3. Replaces the config's teachers."),
    view_policy: Optional[str] = typer.Option(None, "--view-policy", help="squash (default) or center."),
    shard_size: Optional[int] = typer.Option(None, "--shard-size", help="Images per shard [64]."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Images per teacher forward [16]."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="'auto' or ray://host:port to join "
                                                                          "a cluster [$RAY_ADDRESS if set, else "
                                                                          "embedded local Ray]."),
    device: Optional[str] = typer.Option(None, "--device", help="auto (default), cpu or cuda."),
    cpu_workers: Optional[int] = typer.Option(None, "--cpu-workers", help="CPU worker actors [1 per node]."),
    threads_per_worker: Optional[int] = typer.Option(None, "--threads-per-worker", help="torch threads per "
                                                                                        "CPU worker."),
    workers_per_gpu: Optional[int] = typer.Option(None, "--workers-per-gpu", help="Worker actors per GPU [1]."),
    stats: Optional[bool] = typer.Option(None, "--stats/--no-stats", help="Run stats at the end."),
    recompute: Optional[bool] = typer.Option(None, "--recompute", help="Refit frozen statistics at the end "
                                                                       "(kept otherwise, e.g. after a grow)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of the int8-phis calibration sample and of "
                                                            "the statistics' token sampling [0]."),
    calibration_images: Optional[int] = typer.Option(None, "--calibration-images", help="Images each int8-phis "
                                                     "view is calibrated on before its first shard [256]."),
    repair: Optional[bool] = typer.Option(None, "--repair", help="Verify the job's views first and recompute "
                                                                 "every shard that verify flags."),
) -> None:
    """Run the teachers over every image and write the cache; the same command again resumes."""
    from featcache.extract import config as job

    teachers = [job.parse_teacher_flag(t) for t in teacher] if teacher else None
    cfg = job.load(config, source=source, output=out, teachers=teachers, view_policy=view_policy,
                   shard_size=shard_size, batch_size=batch_size, ray_address=ray_address, device=device,
                   cpu_workers=cpu_workers, threads_per_worker=threads_per_worker, workers_per_gpu=workers_per_gpu,
                   stats=stats, recompute_stats=recompute, seed=seed, calibration_images=calibration_images,
                   repair=repair)
    _run_extract(cfg)


def _run_extract(cfg) -> None:
    from featcache.extract.progress import plural
    from featcache.pipelines.extract import run  # the Ray job; the library below it does not import pipelines

    result = run(cfg)
    typer.echo(f"extracted {plural(result.images, 'image')} in {plural(result.processed, 'shard')} "
               f"({result.skipped} already committed) into {result.root}: {result.seconds:.1f} s in all, "
               f"{result.processing_seconds:.1f} s processing at {result.images_per_second:.1f} images/s; "
               f"run record {result.record}")
    if result.failed_images:
        for reason in result.reasons:
            typer.echo(f"  failed: {reason}", err=True)
        typer.echo(f"{plural(result.failed_images, 'image')} failed (all reasons in errors.parquet)", err=True)
    if result.failed_shards:
        n = len(result.failed_shards)
        typer.echo(f"{plural(n, 'shard')} failed after retries and {'is' if n == 1 else 'are'} not committed; "
                   "run the same command again to retry", err=True)
    for line in result.damaged:
        typer.echo(f"  damaged: {line}", err=True)
    if result.exit_code:
        raise typer.Exit(result.exit_code)


@app.command("stats")
@user_errors
def stats_cmd(
    root: str = typer.Argument(..., help="Cache root (local directory or fsspec URL)."),
    views: Optional[list[str]] = typer.Option(None, "--views", "--view", help="Only these views (repeatable)."),
    token_budget: Optional[int] = typer.Option(None, "--token-budget", help="Patch tokens per view, a seeded "
                                                                            "uniform sample [all]."),
    seed: int = typer.Option(0, "--seed", help="Seed of the token sample (and of a fallback rotation)."),
    recompute: bool = typer.Option(False, "--recompute", help="Overwrite frozen statistics."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="'auto' or ray://host:port "
                                                                          "[$RAY_ADDRESS if set, else "
                                                                          "embedded local Ray]."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of the table."),
) -> None:
    """PHI-S (mean, rotation, eigenvalues, alpha) and summary dispersion of each view, from the cache."""
    from featcache.pipelines import stats  # the Ray job; the library below it does not import pipelines

    rows = stats.run(root, views, token_budget=token_budget, seed=seed, recompute=recompute,
                     ray_address=ray_address)
    if as_json:
        typer.echo(json.dumps({"views": stats.json_rows(root, rows)}, indent=1, sort_keys=True))
    else:
        typer.echo(stats.table(rows))


@app.command("train")
@user_errors
def train_cmd(
    root: Optional[str] = typer.Argument(None, help="Cache root to distil from (not needed with --resume)."),
    config: Optional[str] = typer.Option(None, "--config", "-c", help="Run config (.toml, .yaml); flags override it."),
    out: str = typer.Option(..., "--out", "-o", help="Run folder (config, checkpoints, metrics, pictures)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the interrupted run in --out exactly."),
    init: Optional[str] = typer.Option(None, "--init", help="Start a new run from the student weights of this "
                                                             "run folder or checkpoint file."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Optimizer steps (optim.steps)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Images per batch (optim.batch_size)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Peak learning rate (optim.lr)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of the batches, crops and weights."),
    device: Optional[str] = typer.Option(None, "--device", help="auto (default), cpu or cuda."),
    workers: Optional[int] = typer.Option(None, "--workers", help="DataLoader worker processes (data.workers)."),
    prune_spec: Optional[str] = typer.Option(None, "--prune", help="unstructured:D, block:D (4x4), blockRxC:D or 2:4: magnitude-"
                                             "prune the block linears (of the --init weights), then distil."),
    overrides: Optional[list[str]] = typer.Option(None, "--set", help="Any config key: --set loss.mesa=0.5 "
                                                                      "(repeatable; values in TOML or JSON "
                                                                      "syntax, a bare word is a string)."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="Train as a Ray Train job on this "
                                              "cluster ('auto', ray://host:port, 'local': an embedded Ray) "
                                              "[$RAY_ADDRESS if set, else in this process, or torchrun's]."),
    ray_workers: int = typer.Option(1, "--ray-workers", help="Ray Train workers (data-parallel processes; a GPU "
                                                             "each when the cluster has GPUs)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object when the run ends."),
) -> None:
    """Distil a student from the cache's teacher views (no teacher runs); --resume continues a run. Under
    torchrun, or as a Ray Train job (--ray-address), the processes train one student data-parallel."""
    from featcache.train import config as train_config
    from featcache.runs import refuse_flags
    from featcache.train.loop import resumable, train

    sets = list(overrides or [])
    for key, value in (("optim.steps", steps), ("optim.batch_size", batch_size), ("optim.lr", lr),
                       ("seed", seed), ("device", None if device is None else f'"{device}"'),
                       ("data.workers", workers), ("prune", None if prune_spec is None else f'"{prune_spec}"')):
        if value is not None:
            sets.append(f"{key}={value}")
    if resume:
        if config or root or sets or init:  # a finished run says how to go on (--init) first
            refuse_flags(lambda: resumable(out), "no ROOT, --config, --init or overrides")
        cfg = None
    else:
        cfg = train_config.load(config, cache=root, overrides=sets)
    ray_address = ray_address or os.environ.get("RAY_ADDRESS", "").strip() or None
    if ray_address is not None or ray_workers != 1:
        from featcache.pipelines import train as ray_train

        result = ray_train.run(cfg, out, resume=resume, init=init, ray_address=ray_address, workers=ray_workers)
    else:
        result = train(cfg, out, resume=resume, init=init)
    if result.rank:  # one of several data-parallel processes: rank 0 says how the run ended
        return
    if as_json:
        typer.echo(json.dumps(dataclasses.asdict(result), indent=1, sort_keys=True))
    else:
        losses = ", ".join(f"{k.removeprefix('heldout/')} {v:.4f}" for k, v in result.heldout.items())
        knn = ", ".join(f"{k.removeprefix('knn/')} {v:.3f}" for k, v in result.knn.items())
        typer.echo(f"trained {result.steps} steps in {result.seconds:.1f} s into {result.run}"
                   + (f"; held-out: {losses}" if losses else "") + (f"; kNN top-1: {knn}" if knn else ""))


@app.command("export")
@user_errors
def export_cmd(
    run: str = typer.Argument(..., help="Run folder of 'featcache train' (a path or an object-store URL)."),
    out: str = typer.Option(..., "--out", "-o", help="Folder to write (new or empty): model.safetensors + config.json."),
    which: str = typer.Option("best", "--checkpoint", help="Checkpoint to export: best (last when the run has none) or last."),
) -> None:
    """Write a trained student as a self-contained folder that load_student(DIR) reads without the cache or the run."""
    from featcache.train.product import export

    written = export(run, out, which)
    typer.echo(f"exported {run} ({which}) to {written}: load it with featcache.train.load_student({str(written)!r})")


featsharp_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None,
                            help="Train and evaluate a FeatSharp upsampler for a fixed-resolution teacher.")
app.add_typer(featsharp_app, name="featsharp")


@featsharp_app.command("train")
@user_errors
def featsharp_train_cmd(
    out: str = typer.Option(..., "--out", "-o", help="Checkpoint folder (weights, config, state, metrics)."),
    config: Optional[str] = typer.Option(None, "--config", "-c", help="Settings file (.toml, .yaml: family, "
                                                                       "source, images, steps, ...); flags "
                                                                       "override it."),
    teacher: Optional[str] = typer.Option(None, "--teacher", help="family=siglip2,source=DIR_OR_HF_ID[,revision=R], "
                                                                   "or preset=siglip2-g-384.  [required for a new run]"),
    images: Optional[str] = typer.Option(None, "--images", help="Training images: a folder, a glob or a "
                                                                 ".parquet/.csv list (as index takes).  "
                                                                 "[required for a new run]"),
    resume: bool = typer.Option(False, "--resume", help="Continue the interrupted run in --out exactly "
                                                        "(then give only --out)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Optimizer steps [2000]."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Canvases per step [4]."),
    views: Optional[int] = typer.Option(None, "--views", help="Jittered views per canvas [2]."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Peak learning rate [1e-3]."),
    factor: Optional[int] = typer.Option(None, "--factor", help="Upsampling factor [3]."),
    device: Optional[str] = typer.Option(None, "--device", help="auto (default), cpu or cuda."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of the batches, views, weights and held-out ids."),
    overrides: Optional[list[str]] = typer.Option(None, "--set", help="Any setting: --set heads=4 (repeatable; "
                                                                      "values in TOML or JSON syntax, a bare "
                                                                      "word is a string)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object when the run ends."),
) -> None:
    """Train an upsampler by multi-view consistency on unlabelled images.

    A new run needs --out, --teacher and --images (or a --config giving them); --resume continues the run in
    --out (nothing else given)."""
    from featcache.runs import refuse_flags
    from featcache.upsample import training

    flags = {"steps": steps, "batch_size": batch_size, "views": views, "lr": lr, "factor": factor,
             "device": device, "seed": seed}
    settings = None
    if resume:
        if config or teacher or images or overrides or any(v is not None for v in flags.values()):
            refuse_flags(lambda: training.resumable(out), "no other flags: give only --out")
    else:
        if not config and (not teacher or not images):
            raise UsageError("a new run needs --teacher and --images (or a --config file giving them)")
        settings = training.settings_from(teacher, images, flags, overrides or [], config)
    result = training.train(settings, out, resume=resume)
    typer.echo(json.dumps(result, indent=1, sort_keys=True) if as_json else
               f"trained {result['steps']} steps into {result['out']}")


@featsharp_app.command("eval")
@user_errors
def featsharp_eval_cmd(
    ckpt: str = typer.Argument(..., help="Checkpoint folder of 'featcache featsharp train'."),
    images: str = typer.Option(..., "--images", help="Images: those the checkpoint's training held out are used."),
    views: int = typer.Option(4, "--views", min=1, help="Jittered views per image."),
    every: bool = typer.Option(False, "--all", help="Use every image of --images (none was trained on)."),
    picture: Optional[str] = typer.Option(None, "--picture", help="PNG, a row per image of the first batch "
                                                                   "(titled by image id): the image, PCA of the "
                                                                   "global view, bilinear, FeatSharp and the tiles, "
                                                                   "and the errors on one colour scale."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
    seed: int = typer.Option(1234, "--seed", help="Seed of the jittered views."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of the table."),
) -> None:
    """Held-out reconstruction error of the upsampler and of bilinear upsampling of the global view."""
    from featcache.upsample.evaluate import evaluate, table, worse_than_bilinear

    if picture and not picture.lower().endswith(".png"):
        raise UsageError(f"--picture {picture!r}: write a .png")
    result = evaluate(ckpt, images, views=views, every=every, seed=seed, device=device, picture=picture)
    typer.echo(json.dumps(result.to_dict(), indent=1, sort_keys=True) if as_json else table(result))
    warning = worse_than_bilinear(result)
    if warning:  # on stderr: --json's stdout stays one JSON object; exit 0, the numbers are a valid answer
        typer.echo(warning, err=True)


@dataclasses.dataclass(frozen=True)
class _Model:
    shape: object  # featcache.roofline.VitShape
    resolution: int
    build: object  # device -> a callable running a (B, 3, res, res) batch

    def measure(self, res: int, batch: int, device: str) -> float:
        """Seconds of one forward of a random batch (the fastest over a few seconds, after a warm-up)."""
        import torch

        from featcache.roofline import fastest

        run = self.build(device)
        x = torch.randn(batch, 3, res, res, device=device)
        with torch.inference_mode():
            return fastest(lambda: run(x), device, seconds=2.0)


def _random_teacher(p, device: str):
    """A preset with random weights, refused (one line) when its float32 weights would not fit here."""
    import os

    weights = 4 * sum(t.numel() for t in p.build_meta().parameters())
    if device == "cpu" and weights > os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2:
        raise UsageError(f"{p.name} needs {weights / 2**30:.0f} GiB of float32 weights: too large to --measure "
                         "on this machine (measure it on a GPU, or a student)")
    return p.random_teacher(device)


def _roofline_model(name: str, window: int | None) -> _Model:
    """A teacher preset or ``student-<size>``, as the roofline models it and as random weights run it."""
    from featcache.teachers.presets import PRESETS

    if name in PRESETS:
        p = PRESETS[name]
        return _Model(p.shape, p.size, lambda device: _random_teacher(p, device).extract)
    from featcache.train.student import SIZES, StudentConfig, build_student

    size = name.removeprefix("student-")
    if not name.startswith("student-") or size not in SIZES:
        raise UsageError(f"unknown model {name!r}; models: {', '.join(PRESETS)}, "
                         + ", ".join(f"student-{s}" for s in SIZES))
    cfg = StudentConfig(size=size, vitdet_window_size=window)
    return _Model(cfg.roofline_shape(), 224, lambda device: build_student(cfg).to(device).eval())


class _RooflineCommand(typer.core.TyperCommand):
    """``featcache roofline plot ...`` is a command of its own (its arguments, its ``--help``)."""

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        if args[:1] == ["plot"]:  # runs the plot and exits (SystemExit with its code)
            typer.main.get_command(_roofline_plot_app).main(args[1:], prog_name=f"{ctx.command_path} plot")
        return super().parse_args(ctx, args)


_roofline_plot_app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)


@_roofline_plot_app.command()
@user_errors
def roofline_plot_cmd(
    results: str = typer.Argument(..., help="A CSV of a pruning sweep's results: columns pattern, "
                                  "degree, speedup and one quality column (e.g. heldout_loss; lower is better), "
                                  "one row per point (dense: degree 0, speedup 1)."),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="The PNG to write."),
) -> None:
    """The Sparsity Roofline picture of a pruning sweep: quality against predicted speedup, a line per
    pattern through its degrees, the dense point for reference."""
    from featcache.sparsity_plot import draw

    if not out or not out.lower().endswith(".png"):
        raise UsageError("roofline plot RESULTS.csv --out PICTURE.png")
    picture = draw(results, out)
    typer.echo(f"wrote {out} ({picture.width}x{picture.height})")


@app.command("roofline", cls=_RooflineCommand)
@user_errors
def roofline_cmd(
    model: str = typer.Argument(..., help="A teacher preset (siglip2-g-384, dinov3-7b, sam3) or student-SIZE "
                                          "(student-tiny ... student-huge)."),
    res: Optional[int] = typer.Option(None, "--res", help="Input size in px [the teacher's native size; 224 "
                                                          "for a student]."),
    batch: int = typer.Option(1, "--batch", min=1, help="Images per forward."),
    device: str = typer.Option("h100", "--device", help="a100, h100, h200 (published bf16 peaks and memory "
                                                        "bandwidths), or measured (calibrated on this machine's "
                                                        "CPU, or its GPU with --measure on CUDA)."),
    window: Optional[int] = typer.Option(None, "--window", help="A student's ViTDet window (tokens per side)."),
    sparsity: Optional[list[str]] = typer.Option(None, "--sparsity", help="A pattern on the blocks' linear "
                                                 "layers, repeatable: unstructured:D, block:D (4x4 blocks), "
                                                 "blockRxC:D (e.g. block4x4:0.75, block16x16:0.9), 2:4; D is the "
                                                 "fraction of weights removed."),
    measure: bool = typer.Option(False, "--measure", help="Also run the model here (random weights) and print "
                                                          "predicted vs measured; implies --device measured."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (a list with --sparsity)."),
) -> None:
    """Predicted time of a model's forward, per layer type, from the roofline: each operation takes
    max(FLOPs / peak, bytes / bandwidth) on the device (matrix products' FLOPs, a multiply-add being two;
    each tensor read and written once; attention as one fused kernel), summed over the forward.

    With --sparsity, the blocks' linear layers are sparse and the predicted speedup is printed:
    unstructured (CSR) and block (BSR) keep a fraction 1 - D of the FLOPs and weights, plus int32 indices
    (one per kept weight, or per kept R x C block); 2:4 keeps all the FLOPs but runs them at the device's
    2:4 sparse peak (twice the dense one on A100, H100, H200), with half the weights and 2 bits of index
    per kept weight. Attention stays dense, which bounds the speedup. No sparse kernel is run.

    'featcache roofline plot RESULTS.csv --out PNG' draws a pruning sweep (see its --help).
    """
    from featcache import roofline

    target = _roofline_model(model, window)
    res = target.resolution if res is None else res
    if res < target.shape.patch:
        raise UsageError(f"--res {res}: give an input size of at least {target.shape.patch} px (one patch)")
    patterns = [_sparsity(spec) for spec in sparsity or []]
    cuda = measure and device == "cuda"
    hw = roofline.measure("cuda" if cuda else "cpu") if measure or device in ("measured", "cuda") else \
        roofline.HARDWARE.get(device)
    if hw is None:
        raise UsageError(f"unknown device {device!r}; devices: {', '.join(roofline.HARDWARE)}, measured")
    dense = roofline.ops(target.shape, res, res, batch, hw.itemsize)
    reports = [roofline.report(model, res, batch, hw, roofline.predict(dense, hw))]
    if measure:
        reports[0]["measured_seconds"] = target.measure(res, batch, "cuda" if cuda else "cpu")
    for s in patterns:
        sparse_ops = [roofline.sparse(o, s.pattern, s.degree, s.block) for o in dense]
        r = roofline.report(f"{model} {s}", res, batch, hw, roofline.predict(sparse_ops, hw))
        r["speedup"] = reports[0]["predicted_seconds"] / r["predicted_seconds"]
        reports.append(r)
    if as_json:
        typer.echo(json.dumps(reports[0] if len(reports) == 1 else reports, indent=1))
        return
    typer.echo("\n\n".join(roofline.table(r) + (f"\npredicted speedup {r['speedup']:.3f}" if "speedup" in r else "")
                            for r in reports))


def _sparsity(spec: str):
    """A ``--sparsity`` spec as a roofline.Sparsity, refused in one line."""
    from featcache.roofline import parse_sparsity

    try:
        return parse_sparsity(spec)
    except ValueError as e:
        raise UsageError(f"--sparsity {spec!r}: {e}") from None


@app.command("plan")
@user_errors
def plan_cmd(
    config: Optional[str] = typer.Argument(None, help="The extract job file (YAML or TOML); flags override it."),
    teacher: Optional[list[str]] = typer.Option(None, "--teacher", help="Repeatable, as extract's --teacher: "
                                                "family=dinov3,source=DIR_OR_HF_ID[,resolutions=224+512][,mosaic=K]"
                                                "[,codec=f32|int8-phis|int4-pca][,name=N][,upsampler=CKPT], or "
                                                "preset=sam3[,mosaic=3] (upsampler=CKPT: a 'featcache featsharp "
                                                "train' checkpoint; one view at its canvas)."),
    images: Optional[int] = typer.Option(None, "--images", min=1, help="Images the job covers [the manifest's "
                                                                       "count of the source or output]."),
    device: Optional[str] = typer.Option(None, "--device", help="a100, h100, h200, or measured (this machine) "
                                                                "[h100; measured with --measure]."),
    efficiency: float = typer.Option(1.0, "--efficiency", min=1e-3, max=1.0, help="Fraction of the roofline a "
                                     "forward reaches (or --measure it)."),
    measure: bool = typer.Option(False, "--measure", help="Run a sample of the job's images through its teachers "
                                                          "here: each view's efficiency, and the whole job's time "
                                                          "per image by stage (needs the job's manifest)."),
    sample: int = typer.Option(16, "--sample", min=1, help="Images --measure decodes."),
    gpus: int = typer.Option(1, "--gpus", min=1, help="GPUs (or workers) sharing the job."),
    storage_gbps: Optional[float] = typer.Option(None, "--storage-gbps", help="Write bandwidth of the output "
                                                                              "storage, GB/s."),
    train_samples_per_s: Optional[float] = typer.Option(None, "--train-samples-per-s", help="Training rate to "
                                                        "size the read bandwidth for."),
    shard_size: Optional[int] = typer.Option(None, "--shard-size", help="Images per shard [64]."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of the table."),
) -> None:
    """What an extract job costs before it runs: GPU-hours, bytes, write and read bandwidth per view."""
    import torch

    from featcache import estimate, roofline
    from featcache.extract import config as job
    from featcache.extract.progress import plural
    from featcache.log import waiting

    teachers = [job.parse_teacher_flag(t) for t in teacher] if teacher else None
    cfg = job.load(config, teachers=teachers, output=None if config else "plan", shard_size=shard_size)
    if not cfg.teachers:
        raise UsageError("no teachers: give a job file or --teacher")
    device = device or ("measured" if measure else "h100")
    if device != "measured" and device not in roofline.HARDWARE:
        raise UsageError(f"unknown device {device!r}; devices: {', '.join(roofline.HARDWARE)}, measured")
    if measure and device != "measured" and not torch.cuda.is_available():
        raise UsageError(f"--measure times this machine's CPU: plan with --device measured, or measure on a GPU "
                         f"to plan for {device}")
    manifest = None if images and not measure else _manifest(cfg)  # with --images nothing needs reading
    if manifest is None and (measure or images is None):
        raise UsageError("give --images N (no manifest.parquet at the job's output or source to count)" if not measure
                         else "--measure samples the job's images: index the source first (no manifest.parquet at "
                              "the job's output or source)")
    n = images or manifest.num_rows
    local = "cuda" if torch.cuda.is_available() else "cpu"
    hw = roofline.HARDWARE.get(device)
    if device == "measured":
        with waiting(f"calibrating the roofline of this {local}…"):
            hw = roofline.measure(local)
    measured, megapixels = None, None
    if measure:
        scratch = cfg.output if cfg.output and "://" not in cfg.output and os.path.isdir(cfg.output) else None
        with waiting(f"timing {sample} of the job's images through its teachers here…"):
            measured = estimate.measure_job(cfg, manifest, hw, sample, scratch=scratch)
        megapixels = float(sum(w * h for w, h in zip(manifest.column("width").to_pylist(),
                                                     manifest.column("height").to_pylist()))) / manifest.num_rows / 1e6
    with waiting(f"describing {plural(len(cfg.teachers), 'teacher')} from their configs…"):
        result = estimate.estimate(cfg, n, hw, efficiency, gpus, storage_gbps, cfg.shard_size or 64,
                                   image_id_bytes=24 if manifest is None else estimate.image_id_bytes(manifest),
                                   train_samples_per_s=train_samples_per_s, measured=measured,
                                   megapixels_per_image=megapixels)
    typer.echo(json.dumps(result, indent=1) if as_json else estimate.table(result))


def _manifest(cfg):
    """The job's output or source manifest (a cache root or an index), or None. An object store that
    cannot be used is refused in one line first, as every command reading one does."""
    from featcache.store.location import locate
    from featcache.store import tables

    for root in (cfg.output, cfg.source):
        if not root or "*" in root:  # a glob of shards or images holds no manifest
            continue
        check_reachable(root)
        if locate(root).join(tables.MANIFEST).exists():
            return tables.read_manifest(locate(root))
    return None


@app.command("viz")
@user_errors
def viz_cmd(
    root: str = typer.Argument(..., help="Cache root (local directory or fsspec URL)."),
    image: str = typer.Option(..., "--image", help="The image's image_id (manifest column)."),
    out: str = typer.Option(..., "--out", "-o", help="PNG file to write."),
    views: Optional[list[str]] = typer.Option(None, "--views", "--view", help="Views to show (repeatable) "
                                                                              "[all]."),
    error: Optional[list[str]] = typer.Option(None, "--error", help="Error heatmap instead: --error A "
                                                                   "--error B (two views), or one view with "
                                                                   "--against."),
    against: Optional[str] = typer.Option(None, "--against", help="A second cache root to compare with."),
) -> None:
    """PCA of each view's dense features as RGB beside the image; or an error heatmap."""
    from featcache import viz

    if not out.lower().endswith(".png"):
        raise UsageError(f"--out {out!r}: viz writes PNG files (name it .png)")
    for location in (root, against):  # the preflight of extract: one line for an unusable object store
        if location:
            check_reachable(location)
    cache = featcache.open_cache(root)
    summary = None
    if error or against:
        keys = error or views or []
        if not keys or len(keys) > 2:
            raise UsageError("give --error VIEW (with --against ROOT) or --error A --error B")
        other = featcache.open_cache(against) if against else None
        found = viz.error_map(cache, image, keys[0], keys[1] if len(keys) > 1 else None, other)
        picture, summary = viz.draw_error(cache, found), found.summary()
    else:
        picture = viz.render(cache, image, views)
    picture.save(out, format="PNG")
    typer.echo(f"wrote {out} ({picture.width}x{picture.height})")
    if summary:
        typer.echo(summary)


@app.command("demo")
@user_errors
def demo_cmd(out: str = typer.Option("demo-cache", "--out", "-o", help="Cache root for the demo.")) -> None:
    """Extract the photos inside scikit-image with tiny offline teachers of all three families, then inspect."""
    from featcache.demo import demo_config, demo_photos, save_demo_teachers
    from featcache.extract import config as job

    photos = demo_photos()
    cfg = job.from_dict(demo_config(out, str(photos / "*.[pj][np]g"), save_demo_teachers()), "demo")
    try:
        _run_extract(cfg)
    except typer.Exit:  # the job ran and some images or shards failed: show what it left
        inspect_cmd(out, as_json=False)
        raise
    inspect_cmd(out, as_json=False)  # a job that did not run (a FeatcacheError) shows no table


def main(argv: list[str] | None = None) -> int:
    """Entry point. Usage errors are typer's (exit 2); featcache errors become one line, exit 2. A
    SIGTERM during a Ray job ends like Ctrl-C (130), but with 143 (128 + 15): what schedulers and
    shells report for a terminated process, so a scheduler's stop is not mistaken for a user's."""
    from featcache.pipelines.ray_session import Terminated

    try:
        app(args=argv, prog_name="featcache")
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except Terminated:
        typer.echo("featcache: terminated (SIGTERM); committed shards are kept: the same command resumes", err=True)
        return 143
    return 0


if __name__ == "__main__":
    sys.exit(main())
