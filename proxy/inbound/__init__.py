"""The app side of a request: the listener (caller bound at accept), guard, routing, the
handler that runs the pipeline, and the per-config runtime it reads.
"""
