"""Algorithm math in pure torch. Nothing here imports Ray or DeepSpeed (a test checks it)."""
