"""``transfer pipeline``: compare -> export + verify every winner -> bench -> one report.

cli.py (the command; calls compare with resolved settings) · steps.py (export and bench steps, resumable) ·
report.py (pipeline.html).
"""
