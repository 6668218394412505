"""moto's standalone server for the AWS tests, run as ``python tests/moto_server.py -p PORT``.

One change, to match AWS rather than to loosen a check: AWS serves AssumeRoleWithWebIdentity
without a request signature ("you do not need AWS security credentials"), while moto 5.2 demands
one once authentication is on. Every other action keeps moto's full signature verification.
"""

import sys

from moto.core.authorization import ActionAuthenticatorMixin
from moto.server import main

_verify = ActionAuthenticatorMixin._authenticate_and_authorize_action


def _verify_like_aws(self, iam_request_cls, resource="*"):
    if self._get_action() == "AssumeRoleWithWebIdentity":
        return None
    return _verify(self, iam_request_cls, resource)


ActionAuthenticatorMixin._authenticate_and_authorize_action = _verify_like_aws  # type: ignore[method-assign]

if __name__ == "__main__":
    main(sys.argv[1:])
