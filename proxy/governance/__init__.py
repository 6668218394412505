"""Governance reports read by people: the inventory of credentials and the evidence report
built from the audit log.
"""
