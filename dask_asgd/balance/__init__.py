"""Automatic communication balancing: the law that picks each worker's
interval and message size, and the scheduler plugin that runs it."""

from ._law import Balancer, BalancerSettings, Decision, Report, fit_link, level_for, split_size

__all__ = ["Balancer", "BalancerSettings", "Decision", "Report", "fit_link", "level_for", "split_size"]
