"""Utilities shared by the benchmarks and the demos: result tables (:mod:`.results`) and exact peak-memory measurement
(:mod:`.profiling`)."""
