"""FITS bytes to a band-ordered cutout: limits, decompression, one header scanner, TAN WCS."""
