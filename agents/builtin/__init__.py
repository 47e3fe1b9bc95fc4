"""Agents shipped with the platform."""
