"""sim layer: a fleet simulation — the real controller against simulated hosts (``cvmotion simulate``)."""
