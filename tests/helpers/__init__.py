"""Helpers shared by the tests (no tests here): tiny configs, the transformers oracle, CLI oracles."""
