"""Our grader and tasks inside the trainers people already use: `langenv.integrations.trl` (a reward
function and datasets for TRL's ``GRPOTrainer``) and `langenv.integrations.verl` (verl's
``compute_score`` and its parquet data format). Each imports its trainer's library only where needed."""
