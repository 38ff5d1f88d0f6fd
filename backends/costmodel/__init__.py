"""Placeholder package marker (to be replaced)."""
