"""Checks on annotations: reference checks refuse, consistency checks report findings."""
