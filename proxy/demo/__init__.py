"""The embedded default: a demo IdP, a verifying upstream and a scripted tour (``credproxy demo``).

The verifying upstream is also what the test suite puts behind credproxy, so a passing test means
a real resource server accepted the request.
"""
