"""The CUDA stack (group ``cuda``): the toolkit, NCCL and cuDNN where the roles install them, and
torch's view of all three.

- versions.py: version numbers: the stack's strings, the libraries' integers, headers, toolkit files
- prefixes.py: where the roles install each part (node.cuda_home / nccl_home / cudnn_home first)
- toolkit.py: ``cuda.toolkit``
- libs.py: ``cuda.nccl``, ``cuda.cudnn`` (the real libraries loaded, their version functions called)
- torch_view.py: ``cuda.torch``

As everywhere in ``checks``: thin probes return dataclasses, pure ``judge_*`` functions hold the rules.
"""

# Importing registers the checks, in this order in reports: the toolkit, then its libraries, then torch.
# isort: off
from checks.cuda import toolkit  # noqa: F401
from checks.cuda import libs  # noqa: F401
from checks.cuda import torch_view  # noqa: F401
# isort: on
