"""Stage runners that are not a quantizer, an exporter or a validator."""
