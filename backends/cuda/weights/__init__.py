"""Where a session's weights come from and how they reach the graph's weight leaves: the
`WeightSource` protocol and random sources (sources.py), transformers checkpoints
(hf_checkpoint.py), GGUF files (gguf_weights.py), the MXFP4 expert format (mxfp4.py), DeepSeek's
MLA weights as the absorbed graph reads them (mla_weights.py), the loader that folds load-time
constants one tensor at a time (loader.py) and the fold itself (fold.py).
"""
