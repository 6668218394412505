"""The audit trail: JSON-lines events written off the event loop, and the ``credential.used``
tallies.
"""
