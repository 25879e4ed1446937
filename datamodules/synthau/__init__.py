"""SynthAU: rendered faces with known AUs, identities and expressions, for tests and demos."""
