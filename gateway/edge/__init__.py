"""The HTTP edge: the server protocol, request limits, routing, endpoint handlers, OpenAPI."""
