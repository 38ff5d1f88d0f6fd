"""Data shipped with the model front ends: `presets/*.json`, published config.json values of
the models `load_source` knows by name."""
