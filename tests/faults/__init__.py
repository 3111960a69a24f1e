"""Fault-injection tests: a TCP proxy and misbehaving servers between chatfeed and the feed."""
