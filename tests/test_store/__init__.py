"""Tests of featcache.store."""
