"""Fakes (not mocks: they keep state the way the real thing would) for the services' tests."""
