"""Shared detection core for the DETR-family detectors (data, backbone, matcher, losses, engine)."""
