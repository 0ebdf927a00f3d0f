"""Contract tests (`gateway test`): an endpoint's cases run against scripted upstreams."""
