"""The demo Director: the whole system on a real GPU or a simulated 12 GB card."""
