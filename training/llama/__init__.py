"""The Llama 2 model in plain PyTorch: `model`, `checkpoint` (Meta and Hugging Face layouts), `generation`, `loss`.

Importing the package turns on PyTorch's transparent huge pages for its CPU tensors of 2 MB and more
(`THP_MEM_ALLOC_ENABLE`; set it to 0 beforehand to keep them off). PyTorch reads the variable at its first CPU
allocation, so a process that made a CPU tensor before importing this package keeps its setting (the training
CLIs import it first); the variable reaches the process's children too. A large tensor made afresh, as every
training step makes its logits and gradients, then costs a page fault per 2 MB instead of one per 4 KB:
`benchmarks/ppo_iteration.py --shape llama2-24m` spends 1.44 s in a PPO iteration's optimisation with them and
1.62 s without (THP_MEM_ALLOC_ENABLE=0), on one CPU thread. GPU memory is not affected.
"""

import os

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
