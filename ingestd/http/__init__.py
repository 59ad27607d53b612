"""The HTTP layer: the aiohttp app and its thin handlers, the fast path and
its head parser, the fleet and device views with their pages."""
