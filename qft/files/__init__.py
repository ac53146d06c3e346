"""Files: qft checkpoints, the transformers quantizer, task adapters, atomic writes, the embedded model."""
