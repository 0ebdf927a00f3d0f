"""Operations: admin API, metrics, live statistics, logs, readiness, diagnostics, dashboard."""
