"""Run as a separate process by the demo: an attacker who copied a token and a proof off the
wire tries to reuse them without the sidecar's key, then asks the sidecar itself. Reads
``token``, ``proof``, the upstream ``url`` and the sidecar's ``url`` (one per line) from stdin,
prints one JSON object of status codes."""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request


def _status(url: str, headers: dict[str, str]) -> int:
    request = urllib.request.Request(url, headers=headers)  # noqa: S310 - loopback demo URL
    try:
        with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def main() -> None:
    token, proof, url, sidecar = (line.strip() for line in sys.stdin.read().splitlines()[:4])
    print(
        json.dumps(
            {
                "token_as_bearer": _status(url, {"Authorization": f"Bearer {token}"}),
                "token_without_proof": _status(url, {"Authorization": f"DPoP {token}"}),
                "token_with_replayed_proof": _status(
                    url, {"Authorization": f"DPoP {token}", "DPoP": proof}
                ),
                "sidecar_asked_by_another_program": _status(sidecar, {}),
            }
        )
    )


if __name__ == "__main__":
    main()
