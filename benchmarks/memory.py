"""Peak memory measurement for the benchmark scripts: see mit/utils/profiling.py for the method."""

from mit.utils.profiling import LiveTensorMemory, peak_memory_bytes

__all__ = ["LiveTensorMemory", "peak_memory_bytes"]
