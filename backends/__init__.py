"""Backends over the placed graph: `backends.cuda` executes it with PyTorch, `backends.costmodel`
prices it. Each owns one rule table keyed by op."""
