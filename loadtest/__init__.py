"""`tritonchat bench`: modes.py picks the mode; bench.py (the concurrency sweep, with peers.py: the
same prompts without a server, prompts.py, stats.py, report.py), perf.py (perf_analyzer, installed by
install_perf_analyzer.py), locustfile.py (locust). Loopback only: net.py."""
