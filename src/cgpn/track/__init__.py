"""Tracking: cgpn features in multi-object trackers, synthetic video, tracking metrics."""
