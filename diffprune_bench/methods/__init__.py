"""Bundled compression methods: one module per method, each registering itself by decorator."""
