"""The report of finished runs behind scripts/report.py, by job:

- collect: which folders are runs, load_run, collect (usable results and the skipped, with why),
  metric_of, budget_mode, mixed_settings, layer_site; the vocabulary CONVENTIONS, METRICS, WEIGHTS.
- stats: aggregate (mean and std over seeds, the dense start), paired_differences (t intervals),
  allocation (learned GBLR MACs per layer).
- tables: load_reference and paper_entry (the paper's numbers in reference.json), CSV and results.md.
- plots: the figures (metric against MACs, allocation, layout); arm_label, the legends' words.
- write: write_report, every table and figure of a set of results.

scripts/report.py uses collect.collect, collect.CONVENTIONS and write.write_report.
"""
