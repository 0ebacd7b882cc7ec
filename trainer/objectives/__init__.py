"""Training objectives: one per stage, all driven by the same loop."""
