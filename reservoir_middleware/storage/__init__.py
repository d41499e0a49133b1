"""Everything that knows Chroma: the store, its child process, and work on stored memory."""
