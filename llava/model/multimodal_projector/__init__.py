"""Projectors that map vision features into the decoder's embedding space."""
