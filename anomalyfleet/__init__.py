"""anomalyfleet: zero-shot visual anomaly detection (AnomalyCLIP) and defect synthesis (AnoGen) on Ray."""

__version__ = "0.1.0"
