"""The machinery under the algorithms: the loop (`loop.train`), the contract with an algorithm
(`context`), run settings (`config`) and their checks (`checks`), evaluation, run control (run
directory, resume, signals, non-finite guard), checkpoints and data parallelism (`distributed`)."""
