"""Reporting: results folders, leaderboards, plots and tables."""
