"""The way out: the pooled upstream connections, header hygiene and the echo scrubber, TLS
contexts for upstreams and identity providers.
"""
