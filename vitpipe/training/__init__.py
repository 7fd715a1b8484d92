"""The one training loop (`loop.fit`) and what it is made of: the recipe (schedule,
optimizer, autocast), the step log, distributed set-up and the out-of-memory advice."""
