"""`smdlm reproduce`: the plan of the chain (stages.py), running it (chain.py), its report
(report.py, report_lambda.py)."""
