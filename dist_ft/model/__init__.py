"""What runs on the workers, model side: ``spec`` (the ``peft:`` section and its checks, no
torch), ``loading`` (model and tokenizer from a local directory), ``peft`` (one builder per
``peft.method``), ``weights`` (what a sync carries, saved artefacts), ``logprobs``, and the tiny
test model (``tiny``) and CPU matmul kernels (``onednn``)."""
