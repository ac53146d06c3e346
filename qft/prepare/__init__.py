"""Preparation: the front door (quantize), targets' checks, Fisher, the error table and bit
allocation, streaming from a folder, the report."""
