"""Outgoing HTTP: the one client toot sends with, and the SSRF guard it connects through."""
