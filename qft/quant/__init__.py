"""Numbers: the formats (NF-k, int-k, FP8), bit packing, and QuantizedTensor, the frozen weight a layer owns."""
