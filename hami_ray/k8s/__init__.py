"""The Kubernetes bridge: hami-ray as hami-scheduler for pods."""
