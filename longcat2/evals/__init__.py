"""Evaluation: synthetic long-context tasks (passkey, NIAH, MQAR, variable tracking) and perplexity."""
