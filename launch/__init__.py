"""Command-line entry points and launcher-environment discovery."""
