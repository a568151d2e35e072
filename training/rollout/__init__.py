"""Online RL's rollouts: completions sampled from the policy (generate.py), then scored."""
