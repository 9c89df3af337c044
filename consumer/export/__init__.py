"""The built-in exporter: game store format, encoding, cache and atomic .npz writing."""
