"""Credentials: the token cache and its sharing between workers, the workload identity, JOSE,
DPoP proofs and batched signing; ``issuers/`` obtain credentials, ``injectors/`` put them on
requests, one module per plug-in, each registered against its config model (``config``).
"""
