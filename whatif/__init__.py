"""tailrace.whatif: placeholder, filled below."""
