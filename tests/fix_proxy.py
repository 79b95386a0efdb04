"""placeholder; the proxy fixture lands with the proxy core."""
