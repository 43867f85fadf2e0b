"""Operators' views of a hami-ray cluster: the status model, the rich view, the Prometheus exporter."""
