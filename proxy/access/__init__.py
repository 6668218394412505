"""Who may use a credential: callers identified by the kernel, the compiled ``allow``
policy, and break-glass grants that widen it for a time.
"""
