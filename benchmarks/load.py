"""HTTP load from a separate process, shared by the load and soak benchmarks."""

from __future__ import annotations

import itertools
import threading
import time

ENDPOINTS = ("/metrics", "/vram/snapshot", "/vram/models")


def client_process(url: str, rate: float, workers: int, ready, stop, out) -> None:
    """Open-loop load: request i is due at t0 + i / rate, whoever of the workers is free."""
    import httpx

    lat: dict[str, list[float]] = {e: [] for e in ENDPOINTS}
    errors: dict[str, int] = {e: 0 for e in ENDPOINTS}
    lock = threading.Lock()
    counter = itertools.count()
    t0 = time.perf_counter() + 0.2

    def worker() -> None:
        with httpx.Client(base_url=url, timeout=10) as c:
            while not stop.is_set():
                i = next(counter)
                due = t0 + i / rate
                delay = due - time.perf_counter()
                if delay > 0 and stop.wait(delay):
                    return
                path = ENDPOINTS[i % len(ENDPOINTS)]
                start = time.perf_counter()
                try:
                    ok = c.get(path).status_code == 200
                except httpx.HTTPError:
                    ok = False
                took = time.perf_counter() - start
                if due < t0 + 1.0:
                    continue  # the first second opens connections: not timed
                with lock:
                    if ok:
                        lat[path].append(took)
                    else:
                        errors[path] += 1

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(workers)]
    for t in threads:
        t.start()
    ready.set()
    stop.wait()
    elapsed = time.perf_counter() - t0 - 1.0
    for t in threads:
        t.join(timeout=15)
    out.put({"latencies": lat, "errors": errors, "elapsed_s": elapsed})


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]
