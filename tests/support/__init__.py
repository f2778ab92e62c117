"""Helpers shared by the featcache tests."""
