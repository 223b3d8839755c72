"""Thin command-line front ends over the library functions (one module per command)."""
