"""The stores (Chroma with its child process; an in-memory one) and work on stored memory."""
