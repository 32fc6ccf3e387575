"""Search over masks: candidate scoring, SNL (the baseline that makes B_ref) and Block Coordinate Descent."""
