"""``ViewReader.row``: one row of a small array without dense bytes, for every layout a ViewSpec allows."""

from __future__ import annotations

import dataclasses

import numpy as np

from featcache.store import Cache
from tests.support.caches import shard_data, spec, write_manifest


def test_rows_of_a_view_without_summaries(tmp_path):
    """summary_channels = 0 is a valid view (a dense-only teacher): its rows read, box and valid too."""
    root = str(tmp_path / "c")
    write_manifest(root, 10)
    view = Cache.open(root).create_view(dataclasses.replace(spec(), summary_channels=0), shard_size=4)
    written = {}
    for k in range(view.num_shards):
        data = shard_data(view, k)
        data["summary"] = data["summary"][:, :0]
        view.write_shard(view.shard_range(k)[0], **data)
        written[k] = data
    with view.reader() as reader:
        for i in (0, 5, 9):
            shard, local = divmod(i, 4)
            assert reader.row("summary", i).shape == (0,)
            np.testing.assert_array_equal(reader.row("box", i), written[shard]["box"][local])
            assert reader.row("valid", i) == 1


def test_prefetch_asks_the_kernel_for_exactly_the_window_s_chunks_and_reads_stay_the_same(tmp_path):
    """``prefetch`` hands the byte range of each tile a window covers to the kernel (posix_fadvise
    WILLNEED), nothing for an uncommitted shard, and the reads that follow return the same bytes."""
    root = str(tmp_path / "c")
    write_manifest(root, 10)
    view = Cache.open(root).create_view(dataclasses.replace(spec(), tile=(2, 2)), shard_size=4)
    for k in range(2):  # shard 2 (rows 8, 9) stays uncommitted
        view.write_shard(view.shard_range(k)[0], **shard_data(view, k))
    with view.reader() as reader:
        asked = []
        reader._ranges.will_need = lambda path, offset, n: asked.append((path, offset, n))
        window = (1, 3, 0, 2)  # rows of two tiles, columns of one
        reader.prefetch(5, window)
        shard, local = divmod(5, 4)
        index = reader._shard_index(shard)
        want = [(reader._path("dense", (shard, 0, 0, 0)), int(index[local, a, 0, 0, 0]), int(index[local, a, 0, 0, 1]))
                for a in (0, 1)]
        assert asked == want and sum(n for *_, n in asked) == reader.bytes_for(window)
        reader.prefetch(9, window)
        assert len(asked) == 2
        np.testing.assert_array_equal(reader.read_dense(5, window), shard_data(view, 1)["dense"][1, 1:3, 0:2])
