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
