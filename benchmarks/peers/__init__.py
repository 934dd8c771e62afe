"""Peer runtimes for the throughput benchmark: environment setup (envs.py) and one runner per runtime."""
