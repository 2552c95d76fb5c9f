"""Re-ID in multi-object tracking: the appearance embedder trackers call (``embedder.TrackerEmbedder``)."""
