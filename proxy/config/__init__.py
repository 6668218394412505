"""Configuration: the typed models users write (``model``; one model per issuer ``type`` in
``issuers`` and per ``inject`` in ``credential``, the plug-ins' config-side declarations), loading
YAML with path-named errors, cross-checks, warnings (``loader``), file-mode checks and the JSON
Schema.
"""
