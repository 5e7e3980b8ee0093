# The reward-model registry rows live in annotation.models (RewardModelVersion, TrainingRun) so that the
# web process can read them without importing this package.
