"""The jobs layer: tasks and the worker processes every long computation runs in, the task kinds, a training run
start to finish, and torchrun groups. It uses every layer below it (storage, data, models, share, insight)."""
