"""The core: plan values, the fan-out, the merge, templates, the type and error vocabulary."""
