"""The model of PyTorch's CUDA caching allocator behind SimulatedBackend
(app/backends/simulated.py, whose docstring says what it follows):

* core.py: CachingAllocator, the state and the malloc/free logic, under one lock;
* expandable.py: the expandable-segments part of it, a mixin;
* blocks.py: the records it keeps (stats, segments, blocks, pools);
* reports.py: memory_stats()'s keys, the snapshot's segments, the recorded frames, the OOM
  message.
"""

from app.backends.allocator.core import CachingAllocator

__all__ = ["CachingAllocator"]
