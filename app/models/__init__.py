"""The Director's five models, built from their real architectures on the meta device."""
