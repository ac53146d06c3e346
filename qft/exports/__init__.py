"""Exports for serving and sharing: merged compressed-tensors and dense, PEFT, ComPEFT."""
