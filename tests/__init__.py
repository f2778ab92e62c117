"""Tests for featcache."""
