"""Fine-tune stage: distil the float teacher into the compressed student on a few thousand faces."""
