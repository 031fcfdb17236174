"""Benchmarks on frozen embeddings: the seeds' evaluation protocols, baselines and statistics.

Every task scores one exported model's embeddings (or its encoders before alignment, the base
row) and reports its metric with a 95 % bootstrap interval over test proteins
(:mod:`pretrain.benchmark.bootstrap`).
"""
