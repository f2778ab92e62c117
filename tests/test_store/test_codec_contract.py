"""The codec contract, run over every registered codec (as the teacher contract runs over every
family): a round trip within the codec's stated bound on heavy-tailed features, the stored dtype and
its bytes as the store writes them, its self-description, the torch and numpy encoders, each read
space, the calibration honoured. A test-only codec, one class defined here, runs through the same
suite and through the real writer, reader, verify and inspect: a new codec touches no other file.
A grep rule keeps codec names out of comparisons outside ``featcache/store/``."""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

import featcache
from featcache import estimate
from featcache.cli import _inspect_text
from featcache.errors import UsageError
from featcache.stats.calibrate import Calibration
from featcache.store import Cache, ViewSpec
from featcache.store.codec import (QUANTIZATION, SPACES, Codec, Int8Phis, base, codec_from_attrs,
                                   codec_named, codec_names, register_codec)
from featcache.store.statsio import stats_digest
from tests.support.caches import write_manifest

C = 32
REPO = Path(__file__).resolve().parents[2]
BUILT_IN = ["f16", "f32", "int4-pca", "int8-phis"]


def features(n: int, seed: int) -> np.ndarray:
    """Correlated, heavy-tailed float32 features (a multivariate t with 3 degrees of freedom: whole
    tokens far out, as a teacher's rare tokens are), channels on scales 1 to 10, with offsets."""
    fixed = np.random.default_rng(0)
    mixing, offset = fixed.standard_normal((C, C)) * np.geomspace(1, 10, C), fixed.standard_normal(C) * 5
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, C)) / np.sqrt(rng.chisquare(3, (n, 1)) / 3)
    return (offset + z @ mixing.T).astype(np.float32)


@dataclass(frozen=True)
class I16Fixed(Codec):
    """TEST ONLY: raw features as int16 fixed point, 1/8 apart (up to ±4096)."""

    name = "i16-fixed"
    dtype, summary_dtype = "int16", "float32"
    error_bound = 1e-6  # rounding: (1/8)² / 12 per value, against features whose mean square is ~1000

    step = 1 / 8

    def encode(self, x):
        return torch.clamp(torch.round(torch.nan_to_num(x.float()) / self.step), -32767, 32767).to(torch.int16)

    def encode_numpy(self, x: np.ndarray) -> np.ndarray:
        return np.clip(np.rint(np.asarray(x, np.float32) / np.float32(self.step)), -32767, 32767).astype(np.int16)

    def to_raw(self, stored: np.ndarray) -> np.ndarray:
        return stored.astype(np.float32) * np.float32(self.step)

    def describe(self) -> str:
        return f"{self.name} (step {self.step})"


@pytest.fixture
def with_test_codec(monkeypatch):
    """The registry with :class:`I16Fixed` in it, for this test only."""
    monkeypatch.setattr(base, "_CODECS", base._CODECS.copy())
    register_codec(I16Fixed)


def calibrate(codec: type[Codec] = Int8Phis) -> dict:
    """A calibration of ``codec`` (PHI-S statistics and the codec's parameters) fitted on 20 000 tokens,
    as extract fits it. Every codec's calibration has the same PHI-S statistics (same tokens, same seed)."""
    cal = Calibration(C, expected_tokens=20_000, seed=0, codec=codec)
    cal.add(features(20_000, seed=1), np.random.default_rng(1).standard_normal((50, 5)))
    result = cal.finish()
    result["quantization"]["stats_hash"] = stats_digest(result["arrays"])
    return result


@pytest.fixture(scope="module")
def calibration() -> dict:
    """The int8-phis calibration: its statistics give every codec the view transform its PHI-S space reads in."""
    return calibrate()


_FITTED: dict[str, Codec] = {}


def ready(name: str) -> Codec:
    """The codec registered as ``name``, ready to encode and decode: a codec that needs a calibration gets
    its own, through its ``fit`` (once per module), and is built by its ``from_fitted``."""
    cls = codec_named(name)
    if not cls.needs_calibration:
        return cls.from_attrs({"codec": name})
    if name not in _FITTED:
        cal = calibrate(cls)
        _FITTED[name] = cls.from_fitted(cal["arrays"], cal["quantization"])
    return _FITTED[name]


def _phis(cal: dict):
    a = cal["arrays"]
    return lambda: (a["mean"].astype(np.float32), a["rotation"].astype(np.float32))


def test_the_built_in_codecs_are_registered():
    assert set(BUILT_IN) <= set(codec_names())
    assert [codec_named(n).dtype for n in BUILT_IN] == ["float16", "float32", "uint8", "int8"]


class TestCodecContract:
    """Every registered codec, and the test-only one."""

    @pytest.fixture(params=codec_names() + [I16Fixed.name])
    def codec(self, request, calibration) -> Codec:
        if request.param == I16Fixed.name:
            request.getfixturevalue("with_test_codec")
        return ready(request.param)

    def test_a_round_trip_stays_within_its_stated_bound(self, codec):
        x = features(20_000, seed=2)  # not the calibration's tokens
        stored = codec.encode(torch.from_numpy(x)).numpy()
        error = ((codec.decode(stored, "raw").astype(np.float64) - x) ** 2).sum() / (x.astype(np.float64) ** 2).sum()
        assert error <= codec.error_bound <= 2e-2, (codec.name, error)

    def test_it_stores_its_dtype_on_torch_and_numpy_alike(self, codec):
        x = features(5000, seed=3)
        by_torch, by_numpy = codec.encode(torch.from_numpy(x)), codec.encode_numpy(x)
        assert by_torch.dtype == codec.torch_dtype and by_numpy.dtype == np.dtype(codec.dtype)
        by_torch = by_torch.numpy()
        assert by_torch.shape == by_numpy.shape == (*x.shape[:-1], codec.stored_width(C))
        differ = by_numpy != by_torch  # float32 products summed in another order: a rounding tie at most
        assert differ.mean() < 1e-4
        if differ.any():  # ... which moves a value by one code step
            assert np.dtype(codec.dtype).kind in "iu"
            a, b = (codec.decode(s, "raw").astype(np.float64) for s in (by_numpy, by_torch))
            assert ((a - b) ** 2).sum() <= 1e-5 * (x.astype(np.float64) ** 2).sum()

    def test_its_bytes_per_value_are_what_the_store_writes(self, codec, tmp_path):
        view = _view(tmp_path / "cache", codec.name)
        codes = _write(view, codec)
        arrays = {name: view.array(name) for name in ("dense", "summary")}
        assert arrays["dense"].dtype == np.dtype(codec.dtype) and arrays["summary"].dtype == np.dtype(codec.summary_dtype)
        assert arrays["dense"].dtype.itemsize == codec.bytes_per_value
        assert arrays["dense"].shape[-1] == codec.stored_width(C) == view.spec.stored_channels
        assert estimate.data_bytes(view.spec, view.num_images, view.shard_size) == _data_bytes(view)
        with view.reader() as reader:
            assert np.array_equal(reader.read_dense(5, space="stored"), codes[5])

    def test_it_describes_itself_as_its_view_attrs_do(self, codec):
        stored = json.loads(json.dumps(codec.to_dict()))  # attrs are JSON
        assert stored["codec"] == codec.name and set(stored) <= {"codec", QUANTIZATION}
        assert type(codec).from_attrs(stored) == codec and codec_from_attrs(stored) == codec
        assert codec.describe().startswith(codec.name) and "\n" not in codec.describe()

    def test_it_decodes_to_each_space(self, codec, calibration):
        stored, phis = codec.encode_numpy(features(2000, seed=4)), _phis(calibration)
        for space in SPACES:
            assert codec.decode(stored, space, phis).dtype == codec.dtype_in(space), space
        assert codec.decode(stored, "stored") is stored
        raw = codec.decode(stored, "raw").astype(np.float64)
        a = calibration["arrays"]
        back = codec.decode(stored, "phis", phis).astype(np.float64) @ a["inverse"].T + a["mean"]
        assert np.abs(back - raw).max() <= 1e-4 * np.abs(raw).max()  # the PHI-S space is the raw one, transformed
        with pytest.raises(UsageError, match="space 'pixels' is not one of raw, phis, stored"):
            codec.decode(stored, "pixels")

    def test_the_device_decodes_as_the_host_does(self, codec, calibration):
        """``decode_torch`` (the training device's decoding: on the device for a codec that says so,
        through the host otherwise) gives the host's floats in both float spaces."""
        stored, phis = codec.encode_numpy(features(2000, seed=4)), _phis(calibration)
        for space in ("raw", "phis"):
            host = codec.decode(stored, space, phis).astype(np.float32)
            device = codec.decode_torch(torch.from_numpy(stored), space, phis)
            assert device.dtype == torch.float32 and device.shape == host.shape
            assert torch.allclose(device, torch.from_numpy(host), rtol=1e-5, atol=1e-5 * float(np.abs(host).max()))

    def test_finite_features_store_no_nonfinite_token(self, codec):
        stored = codec.encode_numpy(features(2000, seed=8))
        assert codec.nonfinite_tokens(stored).shape == (2000,) and not codec.nonfinite_tokens(stored).any()

    def test_its_calibration_is_honoured(self, codec):
        bare = type(codec).from_attrs({"codec": codec.name})  # a view's attrs before any calibration
        stored = codec.encode_numpy(features(100, seed=5))
        if not codec.needs_calibration:
            assert bare.calibrated and np.array_equal(bare.decode(stored), codec.decode(stored))
            return
        assert not bare.calibrated and codec.calibrated
        for attempt in (lambda: bare.decode(stored), lambda: bare.decode(stored, "phis"),
                        lambda: bare.encode(torch.zeros(2, C))):
            with pytest.raises(UsageError, match="calibrated") as e:
                attempt()
            assert "\n" not in str(e.value)

    def test_a_view_that_needs_a_calibration_it_lacks_refuses_to_decode(self, codec, tmp_path):
        view = _view(tmp_path / "cache", codec.name)
        _write(view, codec)
        with view.reader() as reader:
            if codec.needs_calibration:
                with pytest.raises(UsageError, match="has no calibration yet"):
                    reader.read_dense(0)
            else:
                assert np.allclose(reader.read_dense(0), codec.decode(reader.read_dense(0, space="stored")))


def _view(root: Path, codec: str):
    """A cache of 6 images (shards of 4) with one view of ``codec``, 2x3 cells of C channels."""
    write_manifest(str(root), 6)
    spec = ViewSpec(key="t@32", grid=(2, 3), channels=C, summary_channels=5, codec=codec,
                    teacher={"family": "test", "source": "none"})
    return Cache.open(str(root)).create_view(spec, shard_size=4)


def _write(view, codec: Codec) -> np.ndarray:
    """Encode features for every row, write and commit every shard; the codes written."""
    x = features(view.num_images * 6, seed=6).reshape(view.num_images, 2, 3, C)
    codes = codec.encode(torch.from_numpy(x)).numpy()
    rng = np.random.default_rng(7)
    for k in range(view.num_shards):
        start, stop = view.shard_range(k)
        view.write_shard(start, codes[start:stop], rng.standard_normal((stop - start, 5)),
                         rng.uniform(0, 32, (stop - start, 4)))
    return codes


def _data_bytes(view) -> int:
    """Bytes of the view's array data objects on disk (what ``estimate.data_bytes`` predicts)."""
    folder = Path(view.loc.path)
    return sum(p.stat().st_size for name in ("dense", "summary", "box", "valid")
               for p in (folder / name).rglob("*") if p.is_file() and p.name != "zarr.json")


def test_an_unknown_codec_is_refused_with_the_known_ones():
    with pytest.raises(UsageError, match=r"^codec 'int4' is not one of f16, f32, int4-pca, int8-phis$"):
        codec_named("int4")
    with pytest.raises(UsageError, match=r"^view t@32: codec 'int4' is not one of f16, f32, int4-pca, int8-phis$"):
        ViewSpec(key="t@32", grid=(2, 2), channels=4, summary_channels=0, codec="int4")


def test_a_name_is_registered_once(with_test_codec):
    with pytest.raises(ValueError, match="codec 'i16-fixed' is registered twice"):
        register_codec(I16Fixed)


def test_a_new_codec_is_one_class(with_test_codec, tmp_path):
    """The test-only codec, registered here, goes through the real writer, reader, verify and inspect."""
    root = tmp_path / "cache"
    view = _view(root, I16Fixed.name)
    codes = _write(view, I16Fixed())
    x = features(view.num_images * 6, seed=6).reshape(view.num_images, 2, 3, C)
    reopened = Cache.open(str(root)).view("t@32")  # the codec comes back from the view's attrs
    assert reopened.spec.codec_type is I16Fixed
    with reopened.reader() as reader:
        assert np.array_equal(reader.read_dense(3, (0, 2, 1, 3), space="stored"), codes[3, :, 1:])
        raw = np.stack([reader.read(i).dense for i in range(view.num_images)])
    assert raw.dtype == np.float32 and np.abs(raw - x).max() <= I16Fixed.step / 2
    report = featcache.verify(str(root))
    assert report.ok and report.shards_checked == 2, [str(p) for p in report.problems]
    assert "i16-fixed (step 0.125)" in _inspect_text(featcache.inspect(str(root)))


# ---- the grep rule: codec names are compared only inside featcache/store/ -----------------------

def name_comparisons(source: str, names: set[str]) -> list[int]:
    """Lines of ``source`` comparing something with a codec name (``==``, ``!=``, ``in (...)``)."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Compare):
            continue
        operands = [node.left, *node.comparators]
        literals = [e for o in operands for e in ([o] if isinstance(o, ast.Constant) else
                                                   getattr(o, "elts", []) if isinstance(o, (ast.Tuple, ast.List, ast.Set))
                                                   else [])]
        if any(isinstance(e, ast.Constant) and e.value in names for e in literals):
            lines.append(node.lineno)
    return lines


def test_the_rule_finds_a_comparison_and_leaves_messages_alone():
    source = ('if view.spec.codec == "int8-phis":\n    pass\n'
              'ok = codec in ("f16", "f32")\n'
              'print(f"int8-phis (scale {s})", "f16")\n'
              'x = {"codec": "f32"}\n')
    assert name_comparisons(source, set(BUILT_IN)) == [1, 3]


def test_no_module_outside_the_store_compares_a_codec_name():
    names = set(codec_names())
    store = REPO / "featcache" / "store"
    found = [f"{path.relative_to(REPO)}:{line}"
             for folder in ("featcache", "train", "pipelines") for path in sorted((REPO / folder).rglob("*.py"))
             if store not in path.parents for line in name_comparisons(path.read_text(), names)]
    assert found == [], "compare codec names only inside featcache/store/ (ask the codec instead): " + ", ".join(found)
