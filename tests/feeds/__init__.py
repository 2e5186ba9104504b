"""Tests of the feeds library, one file per source module."""
