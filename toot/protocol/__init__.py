"""The wire protocol, shared by both sides: events, names, signatures and bearer tokens.

It imports nothing else of toot but its settings and exceptions.
"""
