"""The process: server start and graceful shutdown, assembly of a config into a runtime,
pre-forked workers, the telemetry and control listeners.
"""
