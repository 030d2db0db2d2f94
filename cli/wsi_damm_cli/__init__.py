"""Command line of wsi-damm: thin click commands over the library."""
