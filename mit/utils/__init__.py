"""Utilities shared by the benchmarks and the demos: result tables (:mod:`.results`), exact peak-memory measurement
(:mod:`.profiling`) and a model copy sharing the original's weights, for side-by-side timing (:mod:`.shared_copy`)."""
