"""Helpers for the tests: scripts run in subprocesses and classes named by configs launched from them."""
