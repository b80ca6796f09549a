"""picloud: the composition root, CLI and ASGI app."""
