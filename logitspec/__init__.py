"""LogitSpec speculative decoding."""
