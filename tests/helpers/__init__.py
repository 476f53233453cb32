"""Helpers shared by the tests: launching commands, real-text corpora, web fixtures."""
