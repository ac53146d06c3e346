"""The bit allocator's solvers (installed as ``qft.solvers``; the LQ-LoRA issue fills it).

Knows nothing of models: it takes a table of errors and costs.
"""
