"""Re-ID in multi-object tracking: the appearance embedder trackers call (``embedder.TrackerEmbedder``), a
DeepSORT run on MOT-format detections (``tracker``), synthetic video (``synth_video``), and tracking metrics
from py-motmetrics and TrackEval (``metrics``)."""
