"""credproxy: a sidecar that injects per-request, short-lived credentials into an app's calls.

Packages by stage; imports point down this list only (``errors``, ``log``, ``secret``, ``tasks``,
``metrics`` and the adapters ``wire`` (aiohttp internals) and ``aws_sdk`` (botocore) are leaves
every layer may call)::

    cli ─▶ lifecycle/   server (listeners, signals, drain), assembly (config → runtime), workers,
                        telemetry + control listeners (admin_http, telemetry, control)
           governance/  inventory, evidence                        reports people read
           inbound/     listener → handler (guard, routing, runtime)  the app side of a request
           access/      callers, policy, break_glass               who may use a credential
           credentials/ token_cache, token_share, identity, jose, dpop, signing, issuers/, injectors/
           outbound/    upstream (pool), hygiene (headers, echo scrubber), tls
           config/      model, issuers, base, loader, file_modes
           audit/       trail (JSON lines off the loop), usage (credential.used tallies)

A request::

    app ──HTTP──▶ inbound/listener      caller = kernel peer credentials, bound at accept
                   │ access/policy.Admission   a caller no rule names is closed here
                   │ inbound/guard             Host / Origin / CONNECT checks
                   │ inbound/routing           Host + path prefix → route
                   │ access/policy             caller × method × path (break_glass may widen)
                   │ credentials/token_cache   refresh-ahead, single-flight → issuers/
                   │ credentials/injectors/    bearer, DPoP proof, SigV4, RFC 9421, header
                   ▼
                outbound/hygiene + upstream    header hygiene, pooled keep-alive, streaming
                   ▼
                upstream ──▶ response, echoes of the credential masked ──▶ app
"""

__version__ = "0.1.0"
