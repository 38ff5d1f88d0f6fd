"""The `graphir` command line: one module per group of verbs over the library (cli/main.py
registers them); every option the verbs share is declared once in cli/options.py."""
