"""Drift detection, the drift-check stage, the promotion gate and the traffic simulator."""
