"""credproxy: a sidecar that injects per-request, short-lived credentials into an app's calls.

app ──HTTP──▶ listener (TCP loopback / Unix socket)        server.py, handler.py
               │ route      = Host + path prefix             routing.py
               │ credential = token cache → issuer           token_cache.py, issuers/
               │ injector   = bearer / DPoP proof per call   injectors/, dpop.py
               ▼
            forwarder (pooled client, streaming, hygiene)    forwarder.py
               ▼
            upstream ──▶ response scrubbed of the credential ──▶ app
"""

__version__ = "0.1.0"
