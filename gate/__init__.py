"""The safety gate, its own process (`flywheel gate`): judges each candidate policy against the live one, and rolls back.

service.py is the process (event loop, metrics, rollback publishing); rollback.py the sequential
thumbs-down test; config.py the `gate` settings section. The gate stands a floor above trainer/: it
judges with the checks and the evaluation the trainer also runs before proposing a candidate
(trainer/gate_checks.py, trainer/policy_eval.py), with the reward model published with the candidate.
"""
