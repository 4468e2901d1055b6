"""Peak tensor memory of a call, for tests and benchmarks (CPU and CUDA alike)."""

from __future__ import annotations

from typing import Callable


def peak_tensor_bytes(fn: Callable[[], object]) -> int:
    """Peak live bytes of tensor allocations during ``fn()``.

    Replays the profiler's allocation/free events (``profile_memory=True``) in
    time order: this counts what the allocator hands out (the events behind
    ``torch.profiler``'s memory timeline), not allocator caching or
    fragmentation, so it isolates one call from the rest of the process.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # kineto_results is semi-private; this is the one place that reads it.
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    if not events:
        raise RuntimeError("the profiler recorded no memory events; the measurement would be meaningless")
    current = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        current += event.nbytes()
        peak = max(peak, current)
    return peak
