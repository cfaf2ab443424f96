"""fdsbench: one harness for few-shot industrial defect segmentation (FSS) and few-shot anomaly
detection (FAD) — shared episodes, metrics, timing and run records for every method."""

__version__ = "0.1.0"
