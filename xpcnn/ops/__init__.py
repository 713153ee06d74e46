"""Stateless array functions that layers are built from, written against the Array API."""
