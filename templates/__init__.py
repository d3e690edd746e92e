"""Jinja2 templates of generated programs (package data)."""
