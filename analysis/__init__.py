"""Scaling-law analysis: fits with bootstrap intervals (`fits`), architecture comparisons and retrieval
tables (`compare`), figures and reports (`report`), synthetic data (`synthetic`), a benchmark (`bench`).

It reads frames from `db.queries` or an external CSV and never trains or launches anything.
"""
