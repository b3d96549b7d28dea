"""Load-testing helpers shared by ``bench_serving.py`` and ``soak.py``: a server child process, an
asyncio gRPC client, open-loop workloads, a separate load process, delta payloads, Prometheus
scrapes and the per-phase report. Only ``payloads`` imports torch."""
