"""Exceptions raised by the data pipelines.

Each names the file it is about, so that a failed job's last log line says what to fix without a traceback hunt.
"""
from __future__ import annotations


class DataConfigError(ValueError):
    """A data or loader configuration that cannot work (caught before any rank starts reading)."""


class ManifestError(RuntimeError):
    """`manifest.json` is missing, unreadable, or disagrees with the shard files next to it."""


class DataCorruptionError(RuntimeError):
    """More samples are undecodable or lost to truncated shards than the configured fraction allows."""


class ImageTooLargeError(ValueError):
    """An image whose header declares more pixels than `max_image_pixels` allows; it is skipped and counted like
    an undecodable input, without its pixels ever being decoded."""
