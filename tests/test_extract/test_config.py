"""The job config: TOML and YAML files, flags on top, every key checked, one-line errors (exit 2)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from featcache.cli import main
from featcache.errors import UsageError
from featcache.extract.config import from_dict, load, parse_teacher_flag

TOML = '''
source = "/data/photos"
output = "/data/cache"
shard_size = 32
view_policy = "center"

[[teachers]]
preset = "dinov3-7b"
resolutions = [224, 512]

[[teachers]]
preset = "sam3"
mosaic = 3
'''


def test_toml_and_yaml_give_the_same_config(tmp_path):
    (tmp_path / "job.toml").write_text(TOML)
    (tmp_path / "job.yaml").write_text(
        "source: /data/photos\noutput: /data/cache\nshard_size: 32\nview_policy: center\nteachers:\n"
        "  - {preset: dinov3-7b, resolutions: [224, 512]}\n  - {preset: sam3, mosaic: 3}\n")
    a, b = load(str(tmp_path / "job.toml")), load(str(tmp_path / "job.yaml"))
    assert a == b
    assert a.teachers[0].family == "dinov3" and a.teachers[0].source == "facebook/dinov3-vit7b16-pretrain-lvd1689m"
    assert a.teachers[0].resolutions == (224, 512) and a.teachers[1].mosaic == 3
    assert a.to_dict()["teachers"][1]["source"] == "facebook/sam3"


def test_flags_override_the_file(tmp_path):
    (tmp_path / "job.toml").write_text(TOML)
    cfg = load(str(tmp_path / "job.toml"), output="s3://b/c", batch_size=4, shard_size=None,
               teachers=[parse_teacher_flag("family=vit,source=/m/vit,codec=f32")])
    assert cfg.output == "s3://b/c" and cfg.batch_size == 4 and cfg.shard_size == 32
    assert [t.family for t in cfg.teachers] == ["vit"] and cfg.teachers[0].codec == "f32"


def test_teacher_flag_syntax():
    assert parse_teacher_flag("family=dinov3,source=/x,resolutions=224+512,mosaic=1") == {
        "family": "dinov3", "source": "/x", "resolutions": [224, 512], "mosaic": 1}
    with pytest.raises(UsageError, match="expected key=value pairs"):
        parse_teacher_flag("dinov3:/x")
    with pytest.raises(UsageError, match="'abc' is not an integer"):
        parse_teacher_flag("family=dinov3,source=/x,resolutions=abc")


@pytest.mark.parametrize("data, message", [
    ({"outptu": "/x"}, "unknown key 'outptu'; known keys: source, output"),
    ({"teachers": [{"family": "dinov3", "source": "/x", "resolution": 224}]},
     r"teachers\[0\]: unknown key 'resolution'"),
    ({"teachers": [{"family": "dinov3"}]}, r"teachers\[0\]: missing 'source' \(or give 'preset'\)"),
    ({"teachers": [{"preset": "dino"}]}, "unknown preset 'dino'; presets: siglip2-g-384, dinov3-7b, sam3"),
    ({"shard_size": "big"}, "shard_size must be an int, not 'big'"),
    ({"shard_size": 0}, "shard_size must be >= 1, not 0"),
    ({"stats": "yes"}, "stats must be a bool"),
    ({"view_policy": "crop"}, "view_policy 'crop' is not one of squash, center"),
    ({"teachers": {"family": "dinov3"}}, "'teachers' must be a list"),
    ({"teachers": [{"family": "dinov3", "source": "/x", "codec": "int8"}]}, "codec 'int8' is not one of f16, f32, int4-pca, int8-phis"),
    ({"teachers": [{"family": "dinov3", "source": "/x", "dtype": "float32"}]},
     r"teachers\[0\]: 'dtype' is now 'codec': f16 \(float16\), f32 \(float32\), int8-phis or int4-pca"),
    ({"seed": -1}, "seed must be >= 0, not -1"),
    ({"calibration_images": 0}, "calibration_images must be >= 1, not 0"),
    ({"teachers": [{"family": "sam3", "source": "/x", "mosaic": 2, "resolutions": [504]}]},
     "a mosaic view's size is the native size / mosaic"),
    ({"teachers": [{"family": "siglip2", "source": "/x", "upsampler": {"kind": "featsharp"}}]},
     r"teachers\[0\]: upsampler must be a str"),
    ({"teachers": [{"family": "siglip2", "source": "/x", "upsampler": "/ckpt", "resolutions": [384]}]},
     "an upsampled view's size is the upsampler's canvas"),
    ({"teachers": [{"family": "dinov3", "source": "/a"}, {"family": "dinov3", "source": "/b"}]},
     "two teachers are named 'dinov3'"),
])
def test_bad_configs_are_refused_with_the_reason(data, message):
    with pytest.raises(UsageError, match=message):
        from_dict(data, "job.yaml")


@pytest.mark.parametrize("text, suffix, message", [
    ("source = [", ".toml", "is not valid TOML"),
    ("a: [1, 2", ".yaml", "is not valid YAML"),
    ("{}", ".json", "config files are .toml, .yaml or .yml"),
])
def test_unreadable_config_files(tmp_path, text, suffix, message):
    path = tmp_path / f"job{suffix}"
    path.write_text(text)
    with pytest.raises(UsageError, match=message):
        load(str(path))


def test_cli_config_errors_are_one_line_and_exit_2(tmp_path, capsys):
    """In-process, as the CLI runs them; the first case also in a process of its own (the real exit code)."""
    (tmp_path / "job.yaml").write_text("output: /tmp/x\nteachers: []\nbatch: 3\n")
    proc = subprocess.run([sys.executable, "-c", "import sys; from featcache.cli import main; "
                           "sys.exit(main(sys.argv[1:]))", "extract", str(tmp_path / "job.yaml")],
                          capture_output=True, text=True)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("featcache: error:"), proc.stderr
    assert "unknown key 'batch'" in lines[0]
    for args, message in [([str(tmp_path / "job.yaml")], "unknown key 'batch'"),
                          ([str(tmp_path / "nope.yaml")], "no such config file"),
                          (["--out", str(tmp_path / "c")], "no teachers: give 'teachers' in the config or --teacher"),
                          (["--teacher", "family=dinov3,source=/x"], "no output root"),
                          (["--out", str(tmp_path / "c"), "--teacher", "family=dinov3,source=/x,codec=int4"],
                           "codec 'int4' is not one of f16, f32, int4-pca, int8-phis"),
                          (["--out", str(tmp_path / "c"), "--teacher", "family=dinov3,source=/x",
                            "--calibration-images", "0"], "calibration_images must be >= 1")]:
        code = main(["extract", *args])
        err = capsys.readouterr().err
        assert code == 2, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and message in lines[0] and lines[0].startswith("featcache: error:")


def test_missing_teacher_directory_is_a_one_line_error(tmp_path, photos_dir, capsys):
    code = main(["extract", "--source", str(photos_dir), "--out", str(tmp_path / "c"),
                 "--teacher", f"family=dinov3,source={tmp_path / 'no-model'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1] == f"featcache: error: no such model directory: {tmp_path / 'no-model'}"
    assert not (tmp_path / "c").exists()  # refused before indexing anything


def test_weights_that_fail_to_load_on_a_worker_stop_the_job_with_one_line(tmp_path, photos_dir, capsys):
    from tests.support.teachers import save_dinov3

    folder, _ = save_dinov3(tmp_path / "dino")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # the driver only hashes the bytes
    code = main(["extract", "--source", str(photos_dir), "--out", str(tmp_path / "c"),
                 "--teacher", f"family=dinov3,source={folder}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith(f"featcache: error: cannot load weights from {folder}")
