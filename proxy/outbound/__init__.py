"""The way out: the pooled upstream connections (HTTP/1.1 keep-alive, HTTP/2 multiplexed),
header hygiene and the echo scrubber, TLS contexts for upstreams and identity providers.
"""
