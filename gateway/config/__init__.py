"""The config layer: gateway.yaml parsed and checked into pydantic models, and the table of source
kinds. Nothing below the plan imports it."""
