"""The app side of a request: the listener and its connections (caller bound at accept; HTTP/1.1,
or an HTTP/2 session whose streams are requests), the request as the handler sees it, guard,
routing, the handler that runs the pipeline, and the per-config runtime it reads.
"""
