"""The safety gate, its own process (`flywheel gate`): judges each candidate policy against the live one, and rolls back.

service.py is the process (event loop, evaluation, metrics, rollback publishing); checks.py the pure
checks and verdict; rollback.py the sequential thumbs-down test; config.py the `gate` settings section.
The gate stands a floor above trainer/: it borrows the reward model and PPO's sampling to evaluate.
"""
