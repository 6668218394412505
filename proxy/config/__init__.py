"""Configuration: the typed models users write, the issuer models, loading YAML with
path-named errors, cross-checks, warnings, file-mode checks and the JSON Schema.
"""
