"""Placement scheduler (filled in below)."""
