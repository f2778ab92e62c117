"""Tests of featcache.teachers."""
