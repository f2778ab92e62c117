"""Brace patterns of shard names, and which URIs name an image for the errors summary."""

from __future__ import annotations

import pytest

from featcache.errors import UsageError
from featcache.images import is_image_name
from featcache.sources import patterns, row_uri, tar_uri


def test_ranges_keep_their_zero_padding_and_order():
    assert patterns.expand("s3://b/shards/{00008..00011}.tar") == [
        "s3://b/shards/00008.tar", "s3://b/shards/00009.tar", "s3://b/shards/00010.tar", "s3://b/shards/00011.tar"]
    assert patterns.expand("{8..11}.tar") == ["8.tar", "9.tar", "10.tar", "11.tar"]


def test_groups_expand_as_a_product_leftmost_slowest():
    assert patterns.expand("{train,val}/{0..1}.tar") == ["train/0.tar", "train/1.tar", "val/0.tar", "val/1.tar"]


def test_other_braces_are_kept_and_bad_ranges_refused():
    assert not patterns.has_braces("/data/{abc}/x.tar") and patterns.has_braces("/d/{1..2}.tar")
    assert patterns.expand("/data/{abc}/{1..2}.tar") == ["/data/{abc}/1.tar", "/data/{abc}/2.tar"]
    with pytest.raises(UsageError, match=r"the range \{9..1\} in x/\{9..1\}.tar is empty"):
        patterns.expand("x/{9..1}.tar")
    with pytest.raises(UsageError, match="expands to more than 1,000,000 names"):
        patterns.expand("{0..999}{0..9999}.tar")


def test_member_uris_count_as_images_by_the_member():
    assert is_image_name(tar_uri("s3://b/00001.tar", "dir/abc.jpg"))
    assert not is_image_name(tar_uri("s3://b/00001.tar", "dir/abc.cls"))
    assert is_image_name(row_uri("s3://b/train.parquet", 17)) and not is_image_name("s3://b/train.parquet")
