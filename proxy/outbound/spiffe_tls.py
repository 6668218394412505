"""TLS to upstreams with the workload's SPIFFE identity: the X.509-SVID presented as the client
certificate (``client_cert: svid``) and the upstream authenticated by SPIFFE ID
(``upstream_spiffe_id``): its chain verified against the trust domain's X.509 bundle and its URI
SAN compared, instead of its hostname. Both come from the Workload API's current answer; a
rotation builds a new context at the next request. Key and certificate never touch a disk."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography import x509

from ..errors import CredentialUnavailable, UpstreamTLSError
from ..spiffe.svid import X509SVID, uri_sans
from .tls import ClientTLS, load_in_memory, ssl_context

if TYPE_CHECKING:  # grpc is imported only where SPIFFE is used
    from ..spiffe.workload_api import WorkloadAPI


class SPIFFEPeerContext(ssl.SSLContext):
    """A client context whose peer is authenticated by SPIFFE ID: ``check_peer`` runs after the
    handshake, before a byte of the request is sent."""

    expected_spiffe_id: str


def check_peer(context: ssl.SSLContext | None, transport: asyncio.Transport, where: str) -> None:
    """``UpstreamTLSError`` (and the connection aborted) when ``context`` wants a SPIFFE ID that
    the upstream's certificate does not carry."""
    if not isinstance(context, SPIFFEPeerContext):
        return
    ssl_object = transport.get_extra_info("ssl_object")
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    presented = uri_sans(x509.load_der_x509_certificate(der)) if der else []
    if context.expected_spiffe_id not in presented:
        transport.abort()
        shown = ", ".join(p for p in presented if p.startswith("spiffe://")) or "no SPIFFE ID"
        raise UpstreamTLSError(
            f"{where}: the upstream presented {shown}, not {context.expected_spiffe_id} "
            "(upstream_spiffe_id); nothing was sent"
        )


class SVIDClientTLS(ClientTLS):
    """A route's TLS built from the current X.509-SVID: ``current()`` raises
    ``CredentialUnavailable`` (503, Retry-After) while there is no valid one."""

    def __init__(
        self,
        workload_api: WorkloadAPI,
        *,
        ca_file: Path | None,
        present_svid: bool,
        upstream_spiffe_id: str | None,
        where: str,
        alpn: tuple[str, ...] = (),
    ) -> None:
        super().__init__(ca_file, None, None, where=where, alpn=alpn)
        self._workload_api = workload_api
        self._present = present_svid
        self._peer_id = upstream_spiffe_id
        self._built: tuple[str, ssl.SSLContext] | None = None

    def current(self) -> ssl.SSLContext | bool:
        svid = self._workload_api.x509
        if svid is None:
            why = self._workload_api.last_error or "waiting for the first from the agent"
            raise CredentialUnavailable(
                f"{self._where}: no valid X.509-SVID from the SPIFFE Workload API ({why})",
                retry_after_s=1.0,
            )
        built = self._built
        if built is None or built[0] != svid.fingerprint:
            built = self._built = (svid.fingerprint, self._context_for(svid))
        return built[1]

    def _context_for(self, svid: X509SVID) -> ssl.SSLContext:
        context: ssl.SSLContext
        if self._peer_id is not None:
            peer = SPIFFEPeerContext(ssl.PROTOCOL_TLS_CLIENT)
            peer.minimum_version = ssl.TLSVersion.TLSv1_2
            peer.check_hostname = False  # the SPIFFE ID is checked instead (check_peer)
            peer.verify_mode = ssl.CERT_REQUIRED
            peer.load_verify_locations(cadata=svid.bundle_pem)
            peer.expected_spiffe_id = self._peer_id
            context = peer
        else:
            context = ssl_context(str(self._ca_file) if self._ca_file else None) or (
                ssl.create_default_context()
            )
        if self._alpn:
            context.set_alpn_protocols(list(self._alpn))
        if self._present:
            load_in_memory(context, svid.chain_pem, svid.key)
        return context
