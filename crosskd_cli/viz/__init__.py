"""Pictures: a run's plots (results.png, prediction_gap.png) and detections drawn on images."""
