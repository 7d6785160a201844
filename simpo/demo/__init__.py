"""The demo: a synthetic task, a tiny model built from nothing, and `python -m simpo.demo`.

Nothing here is imported by training or evaluation code: `run` drives train.py and eval.py the
way a user would, `synthetic` writes the task, `tiny` builds the random model and tokenizer.
"""
