"""GPU memory: the planner (from config.json alone), activation offload, and measuring peaks."""
