"""The HTTP edge: the listener, the aiohttp application with its routes and middleware, static pages."""
