"""``transfer compare``: a matrix of baselines and fine-tuned backbones on one split, ranked, with winners.

matrix.py (config, cells, settings resolved once) · measure.py (latency, rows) · ranking.py (ranks, Pareto fronts,
winners) · report.py (leaderboard files, plots, HTML) · cli.py (the command and ``run_compare``).
"""

from transfer.compare.matrix import Cell, CompareSettings, expand_matrix, load_config, resolve_settings
from transfer.compare.ranking import annotate, competition_rank, mean_std, pareto_front, pick_winners
from transfer.compare.report import PLOTS, REPORT_FILES

__all__ = ["PLOTS", "REPORT_FILES", "Cell", "CompareSettings", "annotate", "competition_rank", "expand_matrix",
           "load_config", "mean_std", "pareto_front", "pick_winners", "resolve_settings"]
