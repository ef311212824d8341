"""Feature contract, offline computation and online reads."""
