"""Multi-turn tasks on the coordinator: prompts and rewards around an environment.

The environments themselves (what both sides run) live in `protocol.environments`; here are the
coordinator's halves: the task's prompts, its reward functions (run by the coordinator only,
like every reward), and adapters that bring outside environments in.
"""
