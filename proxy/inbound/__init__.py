"""The app side of a request: the listener (caller bound at accept; HTTP/1.1, or an HTTP/2
session whose streams are requests), guard, routing, the handler that runs the pipeline, and the
per-config runtime it reads.
"""
