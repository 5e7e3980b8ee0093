# The policy and run registry rows live in annotation.models (PolicyVersion, TrainingRun) so that the
# web process can read them without importing this package.
