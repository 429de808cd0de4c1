"""Graph rewrite stage: trace, prune, quantize, calibrate, post-training fixes."""
