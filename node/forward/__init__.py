"""Forwarding approved results: rules (what goes where), the outbox, the worker that sends."""
