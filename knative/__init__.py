"""Serving backends: embedded (gateway, activator, KPA, supervisor) and cluster (render, validate, apply)."""
